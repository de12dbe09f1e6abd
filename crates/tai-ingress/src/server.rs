//! `ingress_http`: the public API (SPEC §3) as a supervised worker. It binds
//! in `pre_start` and, when stopped, stops accepting and lets requests in
//! progress finish before it is gone, closing its listening socket. A
//! worker that is killed (no `post_stop`) leaves the socket to the next
//! incarnation, as a ranch listener outlives its acceptors: the restart
//! does not race the old server's release of the port, and connections that
//! come meanwhile wait in the socket's backlog instead of being refused.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rustc_hash::FxHashSet;
use serde_json::json;
use tai_core::msg::{EnqueueOutcome, IdOrigin, KanbanMsg, KANBAN_QUEUE};
use tai_core::signal::{now_ms, parse_signal, SignalStatus};
use tai_core::ErrorCode;
use tai_store::Store;
use tokio::sync::oneshot;
use tracing::Instrument;
use tracing::{info, warn};
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::auth::{self, Presented, Tenants};
use crate::http::{
    answers, error_reply, json_reply, method_not_allowed, read_body_capped, BodyError,
};
use crate::limits::Limits;
use crate::replay::ReplayCache;

const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// Built once: a custom header name given as text is copied into a new
/// buffer at every insert.
const X_SIGNAL_ID: HeaderName = HeaderName::from_static("x-signal-id");

/// What the public API needs; shared by every request.
pub struct Shared {
    pub store: Store,
    pub tenants: Tenants,
    /// Configured SKUs (Fx-hashed, as `auth::Tenants`).
    pub skus: FxHashSet<String>,
    pub max_body_bytes: usize,
    /// `node.body_read_timeout_secs`.
    pub body_timeout: Duration,
    pub window_secs: u64,
    pub limits: Limits,
    pub replay: Mutex<ReplayCache>,
    /// Set by the node when it starts a graceful shutdown.
    pub draining: Arc<AtomicBool>,
    /// Share of new traces sampled when tracing is on (`None`: off).
    pub trace_sampling: Option<f64>,
    /// `tai_signals_received_total` by outcome, made once when the HTTP
    /// worker starts (after the node installed its recorder): registering
    /// a labelled counter looks its key up in the recorder's map, which was
    /// ~0.7 % of the node's CPU at load when done for every signal.
    pub received: std::sync::OnceLock<Received>,
}

/// The outcome label of a post by its answer's status; anything else is
/// `error`.
const OUTCOMES: [(u16, &str); 9] = [
    (202, "accepted"),
    (200, "duplicate"),
    (400, "invalid"),
    (401, "unauthorized"),
    (408, "timed_out"),
    (413, "too_large"),
    (415, "unsupported_media_type"),
    (429, "rate_limited"),
    (503, "unavailable"),
];

/// One counter handle per outcome, `error` last.
pub struct Received([metrics::Counter; OUTCOMES.len() + 1]);

impl Received {
    fn new() -> Received {
        Received(std::array::from_fn(|i| {
            let outcome = OUTCOMES.get(i).map_or("error", |(_, label)| *label);
            metrics::counter!(tai_core::telemetry::SIGNALS_RECEIVED, "outcome" => outcome)
        }))
    }

    /// The counter of a post answered with `status`.
    fn of(&self, status: StatusCode) -> &metrics::Counter {
        let i = OUTCOMES
            .iter()
            .position(|(code, _)| *code == status.as_u16())
            .unwrap_or(OUTCOMES.len());
        &self.0[i]
    }
}

#[derive(Clone, Copy, Debug)]
pub struct IngressHttp;

pub struct IngressArgs {
    pub shared: Arc<Shared>,
    pub listen: SocketAddr,
    /// Where this worker reports the address it bound; on a restart with port
    /// 0 it binds the same address again, so clients keep working.
    pub bound: Arc<Mutex<Option<SocketAddr>>>,
    /// The listening socket while a worker owns it: left here by a worker
    /// that was killed, for the next to accept on; emptied by a stop.
    pub socket: Arc<Mutex<Option<std::net::TcpListener>>>,
    /// `node.header_read_timeout_secs` and `node.max_connections`.
    pub listening: crate::http::Listening,
}

pub struct IngressState {
    socket: Arc<Mutex<Option<std::net::TcpListener>>>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    evictor: tokio::task::JoinHandle<()>,
}

/// A worker that is killed skips `post_stop`, but its state is dropped: the
/// evictor goes with it (the server ends once its `stop` sender is gone).
impl Drop for IngressState {
    fn drop(&mut self) {
        self.evictor.abort();
    }
}

impl Actor for IngressHttp {
    type Msg = ();
    type State = IngressState;
    type Arguments = IngressArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        args: IngressArgs,
    ) -> Result<IngressState, ActorProcessingErr> {
        // Every outcome's series on `/metrics` at 0 from the start (the
        // recorder is installed before the tree starts).
        args.shared.received.get_or_init(Received::new);
        let listener = listen(&args).await?;
        let local = listener.local_addr()?;
        *args.bound.lock().expect("bound slot") = Some(local);
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(crate::http::serve(
            warp::service(routes(args.shared.clone())),
            listener,
            args.listening,
            async {
                let _ = rx.await;
            },
        ));
        let shared = args.shared.clone();
        let evictor = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                shared.limits.evict_idle();
            }
        });
        let replay_cache_max_entries = args
            .shared
            .replay
            .lock()
            .expect("replay cache")
            .max_entries();
        info!(listen = %local, replay_cache_max_entries, "ingress listening");
        Ok(IngressState {
            socket: args.socket,
            stop: Some(tx),
            server: Some(server),
            evictor,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<()>,
        st: &mut IngressState,
    ) -> Result<(), ActorProcessingErr> {
        st.evictor.abort();
        if let Some(tx) = st.stop.take() {
            let _ = tx.send(());
        }
        if let Some(server) = st.server.take() {
            if tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .is_err()
            {
                warn!("ingress requests still running after 10 s");
            }
        }
        // Closed: a connection now is refused, as the node stops.
        st.socket.lock().expect("socket slot").take();
        info!("ingress stopped accepting");
        Ok(())
    }
}

/// A handle on the socket a killed worker left, or a new socket on
/// `ingress.listen` (the address bound before when that is port 0).
async fn listen(args: &IngressArgs) -> Result<tokio::net::TcpListener, ActorProcessingErr> {
    let left = args.socket.lock().expect("socket slot").take();
    let socket = match left {
        Some(socket) => socket,
        None => {
            let previous = *args.bound.lock().expect("bound slot");
            let addr = match previous {
                Some(prev) if args.listen.port() == 0 => prev,
                _ => args.listen,
            };
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on ingress.listen {addr}: {e}"))?
                .into_std()?
        }
    };
    // The slot keeps one handle, the server accepts on another: the socket
    // stays open as long as either does.
    let handle = socket.try_clone()?;
    *args.socket.lock().expect("socket slot") = Some(socket);
    Ok(tokio::net::TcpListener::from_std(handle)?)
}

pub fn routes(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method: Method, path: warp::path::FullPath, headers: HeaderMap, body| {
                let shared = shared.clone();
                async move {
                    let body = read_body_capped(
                        &headers,
                        body,
                        shared.max_body_bytes,
                        shared.body_timeout,
                    )
                    .await;
                    route(&shared, &method, path.as_str(), &headers, body).await
                }
            },
        )
        .recover(|_: warp::Rejection| async {
            Ok::<_, Infallible>(error_reply(ErrorCode::InvalidSignal, "malformed request"))
        })
        .unify()
}

/// Counts an answer to `POST /v1/signals` (Kaizen's ingress tally and
/// `tai_signals_received_total` by outcome) and passes it on.
fn counted(s: &Shared, r: Response) -> Response {
    tai_core::kaizen::record_ingress(r.status().is_success());
    s.received
        .get_or_init(Received::new)
        .of(r.status())
        .increment(1);
    r
}

/// The request headers the ingress reads, named once: a look-up by
/// `&str` parses and checks the name on every request first.
mod names {
    use warp::http::HeaderName;
    pub static TENANT: HeaderName = HeaderName::from_static(crate::auth::TENANT);
    pub static TIMESTAMP: HeaderName = HeaderName::from_static(crate::auth::TIMESTAMP);
    pub static SIGNATURE: HeaderName = HeaderName::from_static(crate::auth::SIGNATURE);
    pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    pub use warp::http::header::CONTENT_TYPE;
}

fn header<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn with_retry_after(mut r: Response, secs: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(warp::http::header::RETRY_AFTER, v);
    }
    r
}

fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Answers a request. Only `POST /v1/signals` uses the body: one over
/// the limit (413) or cut off is its answer, counted like any other.
async fn route(
    s: &Shared,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BodyError>,
) -> Response {
    let trimmed = path.trim_matches('/');
    // The one hot route first, before the path is split.
    if *method == Method::POST && trimmed == "v1/signals" {
        let r = match body {
            Ok(body) => post_traced(s, path, headers, &body).await,
            Err(e) => e.reply(),
        };
        return counted(s, r);
    }
    let segments: Vec<&str> = trimmed.split('/').collect();
    let get = answers(method, &Method::GET);
    match (method, segments.as_slice()) {
        (_, ["health"]) if get => json_reply(StatusCode::OK, &json!({"status": "ok"})),
        (_, ["ready"]) if get => match crate::not_ready(&s.store, &s.draining).await {
            None => json_reply(StatusCode::OK, &json!({"ready": true})),
            Some(reason) => json_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "reason": reason}),
            ),
        },
        (_, ["v1", "signals", id]) if get => get_signal(s, method, path, headers, id).await,
        (_, ["v1", "signals"]) => method_not_allowed(method, path, &Method::POST),
        (_, ["v1", "signals", _] | ["health"] | ["ready"]) => {
            method_not_allowed(method, path, &Method::GET)
        }
        _ => error_reply(ErrorCode::NotFound, format!("no such endpoint: {path}")),
    }
}

/// A post of a signal within its trace span, timed for Kaizen when accepted.
async fn post_traced(s: &Shared, path: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let started = std::time::Instant::now();
    // Head sampling here, before any span exists: a client's
    // sampled traceparent is followed, new traces are sampled at
    // the configured ratio, and an unsampled signal costs no span.
    let incoming = header(headers, &names::TRACEPARENT).filter(|tp| tai_core::trace::valid(tp));
    let sampled = s.trace_sampling.is_some_and(|ratio| match incoming {
        Some(tp) => tai_core::trace::sampled(tp),
        None => fastrand::f64() < ratio,
    });
    let span = if sampled {
        let span = tracing::info_span!(
            "ingress",
            tenant = header(headers, &names::TENANT).unwrap_or_default(),
            trace_id = tracing::field::Empty,
        );
        if let Some(tp) = incoming {
            tai_core::trace::continue_from(&span, tp);
        }
        if let Some(t) = tai_core::trace::traceparent_of(&span)
            .as_deref()
            .and_then(tai_core::trace::trace_id)
        {
            span.record("trace_id", t.as_str());
        }
        span
    } else {
        tracing::Span::none()
    };
    let r = post_signal(s, path, headers, body).instrument(span).await;
    if r.status() == StatusCode::ACCEPTED {
        let tenant = header(headers, &names::TENANT).unwrap_or_default();
        tai_core::kaizen::record("ingress", "post_signal", tenant, started.elapsed());
    }
    r
}

fn presented(headers: &HeaderMap) -> Presented<'_> {
    Presented {
        tenant: header(headers, &names::TENANT),
        timestamp: header(headers, &names::TIMESTAMP),
        signature: header(headers, &names::SIGNATURE),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    header(headers, &names::CONTENT_TYPE).is_some_and(json_media_type)
}

/// `application/json` or `application/*+json`, in any case, parameters
/// (`; charset=utf-8`) aside.
fn json_media_type(content_type: &str) -> bool {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .as_bytes();
    let Some((kind, subtype)) = mime.split_at_checked(b"application/".len()) else {
        return false;
    };
    kind.eq_ignore_ascii_case(b"application/")
        && (subtype.eq_ignore_ascii_case(b"json")
            || subtype
                .len()
                .checked_sub(b"+json".len())
                .is_some_and(|at| subtype[at..].eq_ignore_ascii_case(b"+json")))
}

async fn post_signal(s: &Shared, path: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    if !is_json(headers) {
        return error_reply(
            ErrorCode::UnsupportedMediaType,
            "Content-Type must be application/json",
        );
    }
    let now = now_secs();
    let auth::Verified {
        tenant_id,
        tenant,
        signature,
        timestamp_secs,
    } = match auth::verify(
        &s.tenants,
        presented(headers),
        "POST",
        path,
        body,
        now,
        s.window_secs,
    ) {
        Ok(ok) => ok,
        Err(e) => return error_reply(ErrorCode::Unauthorized, e.to_string()),
    };
    if let Err(limited) = s.limits.check(tenant_id, tenant.tier) {
        metrics::counter!(tai_core::telemetry::RATE_LIMITED, "scope" => limited.scope).increment(1);
        let r = error_reply(
            ErrorCode::RateLimited,
            format!(
                "{} rate limit exceeded, retry in {} s",
                limited.scope, limited.retry_after_secs
            ),
        );
        return with_retry_after(r, limited.retry_after_secs);
    }
    let mut assigned_id = false;
    let mut signal = match parse_signal(body, now_ms(), || {
        assigned_id = true;
        ulid::Ulid::new().to_string()
    }) {
        Ok(sig) => sig,
        Err(e) => return error_reply(ErrorCode::InvalidSignal, e),
    };
    if signal.tenant_id != tenant_id {
        return error_reply(
            ErrorCode::Unauthorized,
            "tenant_id does not match X-Tai-Tenant",
        );
    }
    if !s.skus.contains(&signal.sku_id) {
        return error_reply(
            ErrorCode::InvalidSignal,
            format!("unknown sku_id {:?}", signal.sku_id),
        );
    }
    // The client's trace context, continued by the `ingress` span (if
    // tracing is on) and passed on through the queue either way.
    signal.traceparent = header(headers, &names::TRACEPARENT)
        .filter(|tp| tai_core::trace::valid(tp))
        .map(str::to_string);
    // Every signal has a trace id for its receipts and logs, traced or not.
    let mut minted_id = None;
    if signal.traceparent.is_none() {
        let (root, id) = tai_core::trace::unsampled_root();
        signal.traceparent = Some(root);
        minted_id = Some(id);
    }
    // A known id is answered as a duplicate (200) even when the request
    // would otherwise be refused as a replay or for draining, so a client can
    // retry an identical request safely. A new signal is not looked up here:
    // the queue checks every enqueue against the store anyway. One still
    // `accepted` goes on to the queue, which alone can tell when a 200 may
    // vouch for it: the embedded queue once the flush that makes it durable
    // is done, the amqp backend once the broker has it (its record, written
    // before the publish, does not prove that).
    // What was read is answered once it is durable (a final record may be
    // a decision still in its group flush): `Store::settled_record`.
    enum Known {
        Answer(Response),
        Accepted,
        Unknown,
    }
    let known = || async {
        // Only a client-chosen id can already be known.
        if assigned_id {
            return Known::Unknown;
        }
        match s.store.settled_record(tenant_id, &signal.id).await {
            Ok(Some(existing)) if existing.status == SignalStatus::Accepted => Known::Accepted,
            Ok(Some(existing)) => {
                Known::Answer(duplicate(&existing.signal_id, existing.status.as_str()))
            }
            Ok(None) => Known::Unknown,
            Err(e) => Known::Answer(unavailable(format!("store: {e}"))),
        }
    };
    if s.draining.load(Ordering::SeqCst) {
        match known().await {
            Known::Answer(r) => return r,
            Known::Unknown => return unavailable("node is draining".into()),
            Known::Accepted => {}
        }
    } else if !s.replay.lock().expect("replay cache").check_and_insert(
        tenant_id,
        signature,
        timestamp_secs,
        now,
    ) {
        match known().await {
            Known::Answer(r) => return r,
            Known::Unknown => {
                return error_reply(
                    ErrorCode::Unauthorized,
                    "replayed request: this signature was already used",
                )
            }
            Known::Accepted => {}
        }
    }
    let span = if tracing::Span::current().is_none() {
        tracing::Span::none()
    } else {
        tracing::info_span!("enqueue", signal = %signal.id, tenant = %signal.tenant_id)
    };
    // A span names itself only when traced; an untraced signal keeps the
    // root minted above, whose trace id is known without a parse.
    match minted_id.filter(|_| span.is_none()) {
        Some(id) => signal.trace_id = Some(id),
        None => {
            if let Some(tp) = tai_core::trace::traceparent_of(&span) {
                signal.traceparent = Some(tp);
            }
            signal.trace_id = signal
                .traceparent
                .as_deref()
                .and_then(tai_core::trace::trace_id);
        }
    }
    // The signal moves to the queue; the answer needs only its id.
    // (The trace id is only for the debug line below, but asking
    // `tracing::enabled!` first is no saving: with per-layer filters it
    // leaves a stale filter state that drops the next span from the OTLP
    // layer, tokio-rs/tracing#2519; the traces test caught it.)
    let (id, trace_id) = (signal.id.clone(), signal.trace_id.clone());
    let origin = if assigned_id {
        IdOrigin::Minted
    } else {
        IdOrigin::Client
    };
    let outcome = enqueue(signal, origin).instrument(span).await;
    if !matches!(outcome, EnqueueOutcome::Accepted) {
        s.replay
            .lock()
            .expect("replay cache")
            .remove(tenant_id, signature, timestamp_secs);
    }
    match outcome {
        EnqueueOutcome::Accepted => {
            tracing::debug!(
                signal = %id,
                tenant = %tenant_id,
                trace_id = trace_id.as_deref().unwrap_or(""),
                "signal accepted"
            );
            let mut r = json_reply(
                StatusCode::ACCEPTED,
                &Answer {
                    duplicate: None,
                    signal_id: &id,
                    status: "accepted",
                },
            );
            if let Ok(v) = HeaderValue::from_str(&id) {
                r.headers_mut().insert(X_SIGNAL_ID, v);
            }
            r
        }
        EnqueueOutcome::Duplicate(existing) => {
            duplicate(&existing.signal_id, existing.status.as_str())
        }
        EnqueueOutcome::Full(why) | EnqueueOutcome::Failed(why) => unavailable(why),
    }
}

/// The answer to a post (fields in the order `json!` printed them): built
/// for every signal, so no JSON tree in between.
#[derive(serde::Serialize)]
struct Answer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
    signal_id: &'a str,
    status: &'a str,
}

fn duplicate(id: &str, status: &str) -> Response {
    let mut r = json_reply(
        StatusCode::OK,
        &Answer {
            duplicate: Some(true),
            signal_id: id,
            status,
        },
    );
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert(X_SIGNAL_ID, v);
    }
    r
}

fn unavailable(why: String) -> Response {
    with_retry_after(error_reply(ErrorCode::Unavailable, why), 1)
}

async fn enqueue(signal: tai_core::signal::Signal, origin: IdOrigin) -> EnqueueOutcome {
    let Some(queue) = ractor::registry::where_is(KANBAN_QUEUE) else {
        return EnqueueOutcome::Full("the queue is restarting".into());
    };
    match ractor::rpc::call(
        &queue,
        |reply| KanbanMsg::Enqueue(signal, origin, reply),
        Some(ENQUEUE_TIMEOUT),
    )
    .await
    {
        Ok(ractor::rpc::CallResult::Success(outcome)) => outcome,
        Ok(ractor::rpc::CallResult::Timeout) => {
            EnqueueOutcome::Failed("the queue did not answer in time".into())
        }
        // The reply was dropped unanswered: the queue stopped with the
        // signal in its hands (a restart, or the node stopping). Whether it
        // was kept is known to a retry with the same id (200 duplicate).
        Ok(ractor::rpc::CallResult::SenderError) => EnqueueOutcome::Failed(
            "the queue stopped before answering (it is restarting or the node is stopping); \
             retry with the same id"
                .into(),
        ),
        Err(_) => EnqueueOutcome::Full("the queue is restarting".into()),
    }
}

async fn get_signal(
    s: &Shared,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    id: &str,
) -> Response {
    let tenant_id = match auth::verify(
        &s.tenants,
        presented(headers),
        method.as_str(),
        path,
        b"",
        now_secs(),
        s.window_secs,
    ) {
        Ok(ok) => ok.tenant_id,
        Err(e) => return error_reply(ErrorCode::Unauthorized, e.to_string()),
    };
    let id = crate::http::decode_segment(id);
    // Only what a crash would leave: a decision still in its group flush is
    // shown once that flush is done (a failed one takes it back).
    match s.store.settled_record(tenant_id, &id).await {
        Ok(Some(rec)) => json_reply(StatusCode::OK, &rec),
        Ok(None) => error_reply(
            ErrorCode::NotFound,
            format!("no signal {id:?} for this tenant"),
        ),
        Err(e) => unavailable(format!("store: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::json_media_type;

    #[test]
    fn json_media_types_are_matched_in_any_case_with_parameters_aside() {
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=UTF-8",
            "application/vnd.acme+json",
            "APPLICATION/VND.ACME+JSON; v=2",
        ] {
            assert!(json_media_type(yes), "{yes:?} is JSON");
        }
        for no in [
            "",
            "text/plain",
            "text/json",
            "application/",
            "application/jsonx",
            "application/xml",
            "application/json+xml",
            "applicatio/json",
            "json",
            "multipart/form-data; boundary=application/json",
        ] {
            assert!(!json_media_type(no), "{no:?} is not JSON");
        }
    }
}
