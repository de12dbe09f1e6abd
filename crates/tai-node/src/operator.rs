//! The operator API (SPEC §4) on `operator.listen`: health, readiness, the
//! live tree, fault injection and shutdown. `/admin` needs the bearer token.
//!
//! One warp filter gathers the request and a plain `match` routes it, so
//! every answer, errors included, is the contract's JSON.

// Helpers return the finished HTTP error response as their `Err`: it is built
// once per request, on the way out, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tai_core::msg::{KanbanMsg, ReplayOutcome, RouterMsg, ENGINE_ROUTER, KANBAN_QUEUE};
use tai_core::signal::{EngineState, Signal};
use tai_core::ErrorCode;
use tai_ingress::http::{
    answers, error_reply as error, json_reply, method_not_allowed, read_body_capped,
};
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::node::NodeState;

const MAX_ADMIN_BODY: usize = 64 * 1024;

pub fn routes(
    state: Arc<NodeState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::body::stream())
        .then(
            move |method: Method,
                  path: warp::path::FullPath,
                  headers: HeaderMap,
                  query: HashMap<String, String>,
                  body| {
                let state = state.clone();
                async move {
                    match read_body_capped(
                        &headers,
                        body,
                        MAX_ADMIN_BODY,
                        Duration::from_secs(state.config.node.body_read_timeout_secs),
                    )
                    .await
                    {
                        Ok(body) => {
                            let req = Request {
                                method: &method,
                                path: path.as_str(),
                                headers: &headers,
                                query: &query,
                                body: &body,
                            };
                            route(&state, req).await
                        }
                        Err(e) => e.reply(),
                    }
                }
            },
        )
        .recover(|_: warp::Rejection| async {
            Ok::<_, Infallible>(error(ErrorCode::InvalidRequest, "malformed request"))
        })
        .unify()
}

fn authorized(state: &NodeState, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(token) = value.strip_prefix("Bearer ") else {
        return false;
    };
    constant_time_eq::constant_time_eq(
        token.as_bytes(),
        state.config.operator.admin_token.as_bytes(),
    )
}

struct Request<'a> {
    method: &'a Method,
    path: &'a str,
    headers: &'a HeaderMap,
    query: &'a HashMap<String, String>,
    body: &'a [u8],
}

/// Every operator endpoint, told from the path alone. [`Endpoint::parse`]
/// is the one table of paths and their methods: the router and its 405s
/// both read it.
enum Endpoint<'a> {
    Health,
    Metrics,
    Ready,
    Board,
    Tree,
    Kill(&'a str),
    Tenants,
    Tenant(&'a str, &'a str),
    Halt(&'a str, &'a str),
    Resume(&'a str, &'a str),
    Policies,
    ReloadPolicies,
    Alerts,
    Kaizen,
    KaizenBaseline,
    Breakers,
    Breaker(&'a str, &'a str),
    Queue,
    DeadLetters,
    Replay(&'a str),
    Receipts,
    ReceiptsHead,
    VerifyReceipts,
    Shutdown,
}

impl<'a> Endpoint<'a> {
    /// The endpoint at `segments` and the one method it takes; `None` for a
    /// path the API does not have.
    fn parse(segments: &[&'a str]) -> Option<(Self, Method)> {
        use Endpoint::*;
        let (get, post) = (Method::GET, Method::POST);
        Some(match *segments {
            ["health"] => (Health, get),
            ["metrics"] => (Metrics, get),
            ["ready"] => (Ready, get),
            ["board"] => (Board, get),
            ["admin", "tree"] => (Tree, get),
            ["admin", "actors", name, "kill"] => (Kill(name), post),
            ["admin", "tenants"] => (Tenants, get),
            ["admin", "tenants", t, s] => (Tenant(t, s), get),
            ["admin", "tenants", t, s, "halt"] => (Halt(t, s), post),
            ["admin", "tenants", t, s, "resume"] => (Resume(t, s), post),
            ["admin", "policies"] => (Policies, get),
            ["admin", "policies", "reload"] => (ReloadPolicies, post),
            ["admin", "alerts"] => (Alerts, get),
            ["admin", "kaizen"] => (Kaizen, get),
            ["admin", "kaizen", "baseline"] => (KaizenBaseline, post),
            ["admin", "breakers"] => (Breakers, get),
            ["admin", "breakers", name, action @ ("reset" | "melt")] => {
                (Breaker(name, action), post)
            }
            ["admin", "queue"] => (Queue, get),
            ["admin", "deadletter"] => (DeadLetters, get),
            ["admin", "deadletter", id, "replay"] => (Replay(id), post),
            ["admin", "receipts"] => (Receipts, get),
            ["admin", "receipts", "head"] => (ReceiptsHead, get),
            ["admin", "receipts", "verify"] => (VerifyReceipts, get),
            ["admin", "shutdown"] => (Shutdown, post),
            _ => return None,
        })
    }

    /// The query parameters the endpoint reads; `None` for the probes and
    /// the scrape, which read none and may be sent anything. Any other
    /// parameter is refused: a misspelt filter (`?tenant_id=acme`) would
    /// otherwise answer with everything, unfiltered.
    fn params(&self) -> Option<&'static [&'static str]> {
        use Endpoint::*;
        Some(match self {
            Health | Metrics | Ready => return None,
            Board => &["token"],
            Tenants => &["state", "limit", "after"],
            DeadLetters => &["tenant", "limit", "after"],
            Replay(_) => &["tenant"],
            Receipts => &["tenant", "after_seq", "limit"],
            Tree | Kill(_) | Tenant(..) | Halt(..) | Resume(..) | Policies | ReloadPolicies
            | Alerts | Kaizen | KaizenBaseline | Breakers | Breaker(..) | Queue | ReceiptsHead
            | VerifyReceipts | Shutdown => &[],
        })
    }
}

/// `400` for a query parameter `endpoint` does not read, naming it and
/// those it does (the first unknown one, by name, so the answer is the same
/// whatever order the client sent them in).
fn unknown_param(
    endpoint: &Endpoint<'_>,
    query: &HashMap<String, String>,
    method: &Method,
    path: &str,
) -> Option<Response> {
    let takes = endpoint.params()?;
    let unknown = query
        .keys()
        .filter(|k| !takes.contains(&k.as_str()))
        .min()?;
    let takes = match takes {
        [] => "no query parameters".to_string(),
        _ => format!("only {}", takes.join(", ")),
    };
    Some(error(
        ErrorCode::InvalidRequest,
        format!("unknown query parameter {unknown:?}: {method} {path} takes {takes}"),
    ))
}

async fn route(state: &NodeState, req: Request<'_>) -> Response {
    let Request {
        method,
        path,
        headers,
        ..
    } = req;
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segments[0] == "admin" && !authorized(state, headers) {
        return error(ErrorCode::Unauthorized, "missing or invalid admin token");
    }
    let Some((endpoint, takes)) = Endpoint::parse(&segments) else {
        return error(ErrorCode::NotFound, format!("no such endpoint: {path}"));
    };
    if !answers(method, &takes) {
        return method_not_allowed(method, path, &takes);
    }
    if let Some(refused) = unknown_param(&endpoint, req.query, method, path) {
        return refused;
    }
    match endpoint {
        Endpoint::Health => json_reply(StatusCode::OK, &json!({"status": "ok"})),
        Endpoint::Metrics => {
            let Some(metrics) = &state.metrics else {
                return error(
                    ErrorCode::NotFound,
                    "metrics are off (kaizen.metrics = false)",
                );
            };
            let mut r = warp::reply::Response::new(metrics.render().into());
            r.headers_mut().insert(
                "content-type",
                warp::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Endpoint::Ready => match state.not_ready().await {
            None => json_reply(StatusCode::OK, &json!({"ready": true})),
            Some(reason) => json_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "reason": reason}),
            ),
        },
        Endpoint::Board => match req.query.get("token") {
            Some(t) if crate::board::token_ok(state, t) => crate::board::login(state),
            Some(_) => error(ErrorCode::Unauthorized, "invalid admin token"),
            None if authorized(state, headers) || crate::board::cookie_ok(state, headers) => {
                crate::board::page(state).await
            }
            None => error(
                ErrorCode::Unauthorized,
                "open /board?token=<admin token> to sign in",
            ),
        },
        Endpoint::Tree => {
            let annotate =
                |name: &str| tai_jidoka::engine_state(name).map(|s| s.as_str().to_string());
            let tree = tai_otp::tree(&state.root, Duration::from_secs(2), &annotate).await;
            json_reply(StatusCode::OK, &tree)
        }
        Endpoint::Kill(name) => kill(state, name),
        Endpoint::Tenants => tenants(req.query).await.unwrap_or_else(|r| r),
        Endpoint::Tenant(t, s) => {
            let (tenant_id, sku_id) = (decode(t), decode(s));
            match call(ENGINE_ROUTER, |reply| RouterMsg::Engine {
                tenant_id,
                sku_id,
                reply,
            })
            .await
            {
                Ok(Some(info)) => json_reply(StatusCode::OK, &info),
                Ok(None) => error(ErrorCode::NotFound, format!("no engine for {t}/{s}")),
                Err(r) => r,
            }
        }
        Endpoint::Halt(t, s) | Endpoint::Resume(t, s) => {
            let (tenant_id, sku_id) = (decode(t), decode(s));
            if let Some(why) = unconfigured(state, &tenant_id, &sku_id) {
                return error(ErrorCode::NotFound, why);
            }
            let answer = if matches!(endpoint, Endpoint::Halt(..)) {
                let reason = match halt_reason(req.body) {
                    Ok(r) => r,
                    Err(r) => return r,
                };
                call(ENGINE_ROUTER, |reply| RouterMsg::Halt {
                    tenant_id,
                    sku_id,
                    reason,
                    reply,
                })
                .await
            } else {
                call(ENGINE_ROUTER, |reply| RouterMsg::Resume {
                    tenant_id,
                    sku_id,
                    reply,
                })
                .await
            };
            engine_answer(answer)
        }
        Endpoint::Policies => json_reply(StatusCode::OK, &json!({"rego": state.rego.files()})),
        Endpoint::ReloadPolicies => reload_policies(state),
        Endpoint::Alerts => {
            match call(
                tai_core::msg::ANDON_ALERTS,
                tai_core::alert::AlertMsg::Recent,
            )
            .await
            {
                Ok(list) => json_reply(StatusCode::OK, &list),
                Err(r) => r,
            }
        }
        Endpoint::Kaizen => kaizen_report(state),
        Endpoint::KaizenBaseline => save_kaizen_baseline(state),
        Endpoint::Breakers => json_reply(StatusCode::OK, &state.executors.breakers.list()),
        Endpoint::Breaker(name, action) => breaker_command(state, &decode(name), action).await,
        Endpoint::Queue => match call(KANBAN_QUEUE, KanbanMsg::Stats).await {
            Ok(stats) => json_reply(StatusCode::OK, &stats),
            Err(r) => r,
        },
        Endpoint::DeadLetters => {
            let (store, query) = (state.store.clone(), req.query.clone());
            let read = blocking(move || dead_letters(&store, &query)).await;
            settled(&state.store, read.unwrap_or_else(|r| r)).await
        }
        Endpoint::Replay(id) => replay(state, &decode(id), req.query.get("tenant")).await,
        Endpoint::Receipts => {
            let (store, query) = (state.store.clone(), req.query.clone());
            let read = blocking(move || receipts(&store, &query)).await;
            settled(&state.store, read.unwrap_or_else(|r| r)).await
        }
        // What an export ends with: receipts up to its seq are the ledger.
        Endpoint::ReceiptsHead => {
            let read = match state.store.head() {
                Ok(head) => json_reply(StatusCode::OK, &json!({ "signed_head": head })),
                Err(e) => error(ErrorCode::Internal, format!("store: {e}")),
            };
            settled(&state.store, read).await
        }
        Endpoint::VerifyReceipts => {
            let (store, keys) = (state.store.clone(), state.config.andon.signing_keys.clone());
            let read = match blocking(move || {
                tai_andon::verify_store(&store, &keys, tai_andon::Extent::AsOfHead)
            })
            .await
            {
                Ok(report) => json_reply(StatusCode::OK, &report),
                Err(r) => r,
            };
            settled(&state.store, read).await
        }
        Endpoint::Shutdown => {
            state.request_shutdown("POST /admin/shutdown");
            json_reply(StatusCode::ACCEPTED, &json!({"status": "shutting_down"}))
        }
    }
}

/// The saved baseline; one that cannot be read is logged and the report
/// goes on without it.
fn kaizen_baseline(state: &NodeState) -> Option<serde_json::Value> {
    let bytes = state
        .store
        .meta(tai_store::meta::KAIZEN_BASELINE)
        .map_err(|e| tracing::warn!(error = %e, "cannot read the Kaizen baseline"))
        .ok()??;
    serde_json::from_slice(&bytes)
        .map_err(|e| tracing::warn!(error = %e, "the saved Kaizen baseline is unreadable"))
        .ok()
}

/// `GET /admin/kaizen`: the bottleneck report over the recent samples.
fn kaizen_report(state: &NodeState) -> Response {
    let health = tai_kaizen::report::health(&tai_kaizen::health::readings(&state.config));
    let samples = tai_core::kaizen::samples();
    let report = tai_kaizen::report::report(&samples, kaizen_baseline(state).as_ref(), health);
    json_reply(StatusCode::OK, &report)
}

/// `POST /admin/kaizen/baseline`: the current per-stage figures become the
/// baseline later reports compare against.
fn save_kaizen_baseline(state: &NodeState) -> Response {
    let samples = tai_core::kaizen::samples();
    if samples.is_empty() {
        return error(
            ErrorCode::Unavailable,
            "no timings yet: send signals before saving a baseline",
        );
    }
    let baseline = json!({
        "saved_at_ms": tai_core::signal::now_ms(),
        "samples": samples.len(),
        "stages": tai_kaizen::report::stage_summary(&samples),
    });
    let bytes = serde_json::to_vec(&baseline).expect("json");
    match state
        .store
        .put_meta(tai_store::meta::KAIZEN_BASELINE, &bytes)
        .and_then(|()| state.store.flush())
    {
        Ok(()) => json_reply(StatusCode::OK, &baseline),
        Err(e) => error(
            ErrorCode::Internal,
            format!("cannot save the baseline: {e}"),
        ),
    }
}

/// `POST /admin/policies/reload`: every Rego file read again; a file that
/// does not compile is reported (422) and its working version stays.
fn reload_policies(state: &NodeState) -> Response {
    let report = state.rego.reload();
    if report.errors.is_empty() {
        tracing::info!(reloaded = ?report.reloaded, "policies reloaded");
        return json_reply(StatusCode::OK, &report);
    }
    let first = &report.errors[0];
    tracing::warn!(errors = ?report.errors, "policy reload refused for invalid files");
    let mut body = serde_json::to_value(&report).unwrap_or_default();
    body["error"] = json!({
        "code": ErrorCode::InvalidPolicy.as_str(),
        "message": format!("{first} (the working version stays in force)"),
    });
    json_reply(StatusCode::UNPROCESSABLE_ENTITY, &body)
}

/// `POST /admin/breakers/{name}/reset|melt`: the change is durable before
/// the answer, recorded in the ledger, and (on reset) the engines it halted resume.
async fn breaker_command(state: &NodeState, name: &str, action: &str) -> Response {
    let now = tai_core::signal::now_ms();
    let breakers = &state.executors.breakers;
    let changed = match action {
        "melt" => breakers.melt(name, now),
        _ => breakers.reset(name, now),
    };
    let Some(transition) = changed else {
        return error(
            ErrorCode::NotFound,
            format!("no breaker {name:?} (breakers guard webhook executors)"),
        );
    };
    if let Err(e) = state.store.durable().await {
        return error(ErrorCode::Internal, format!("store: {e}"));
    }
    tracing::warn!(breaker = %name, action, "breaker changed by the operator");
    if let Err(e) = tai_jidoka::executor::record_transitions(transition.into_iter().collect()).await
    {
        return error(
            ErrorCode::Unavailable,
            format!("breaker changed but its receipt was not recorded: {e}"),
        );
    }
    match breakers.list().into_iter().find(|b| b.name == name) {
        Some(info) => json_reply(StatusCode::OK, &info),
        None => error(ErrorCode::NotFound, format!("no breaker {name:?}")),
    }
}

/// Fault injection: the named actor is killed, which its supervisor handles
/// as the abnormal exit a panic would be.
fn kill(state: &NodeState, name: &str) -> Response {
    if !state.config.fault_injection() {
        return error(
            ErrorCode::Forbidden,
            "fault injection is disabled (operator.fault_injection = false)",
        );
    }
    let name = decode(name);
    match ractor::registry::where_is(name.clone()) {
        Some(cell) => {
            let id = cell.get_id().to_string();
            tracing::warn!(actor = %name, id = %id, "fault injection: killing actor");
            cell.kill();
            json_reply(StatusCode::ACCEPTED, &json!({"killed": name, "id": id}))
        }
        None => error(
            ErrorCode::NotFound,
            format!("no running actor named {name:?}"),
        ),
    }
}

/// Path segments may be percent-encoded (engine names carry `:`).
/// Why a halt or resume cannot name this engine: a tenant or SKU the
/// configuration does not have. (Without the check an operator's typo
/// started an engine for it and wrote its halt into the ledger.)
fn unconfigured(state: &NodeState, tenant: &str, sku: &str) -> Option<String> {
    if !state.config.tenants.iter().any(|t| t.id == tenant) {
        Some(format!("no tenant {tenant:?} in the configuration"))
    } else if !state.config.skus.contains_key(sku) {
        Some(format!("no SKU {sku:?} in the configuration"))
    } else {
        None
    }
}

fn decode(s: &str) -> String {
    tai_ingress::http::decode_segment(s).into_owned()
}

/// Calls a layer's worker by its registered name; a worker that is down or
/// slow is a 503, as it is for a restarting layer.
pub(crate) async fn call<M, R>(
    name: &str,
    build: impl FnOnce(ractor::RpcReplyPort<R>) -> M,
) -> Result<R, Response>
where
    M: ractor::Message,
    R: Send + 'static,
{
    let down = || {
        error(
            ErrorCode::Unavailable,
            format!("{name} is not running (restarting?)"),
        )
    };
    let cell = ractor::registry::where_is(name).ok_or_else(down)?;
    match ractor::rpc::call(&cell, build, Some(Duration::from_secs(30))).await {
        Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
        Ok(ractor::rpc::CallResult::Timeout) => Err(error(
            ErrorCode::Unavailable,
            format!("{name} did not answer in time"),
        )),
        // The reply was dropped unanswered: the worker stopped meanwhile.
        Ok(ractor::rpc::CallResult::SenderError) => Err(error(
            ErrorCode::Unavailable,
            format!("{name} stopped before answering (restarting?)"),
        )),
        Err(_) => Err(down()),
    }
}

fn engine_answer(r: Result<Result<tai_core::signal::EngineInfo, String>, Response>) -> Response {
    match r {
        Ok(Ok(info)) => json_reply(StatusCode::OK, &info),
        Ok(Err(e)) => error(ErrorCode::Unavailable, e),
        Err(r) => r,
    }
}

async fn replay(state: &NodeState, signal_id: &str, tenant: Option<&String>) -> Response {
    // Without a tenant every dead letter is looked at: off the async
    // workers, with the letter read in the same trip when it is one.
    let (store, id, tenant) = (state.store.clone(), signal_id.to_string(), tenant.cloned());
    let found = blocking(move || {
        let tenants = store.dead_letter_tenants(&id, tenant.as_deref())?;
        let letter = match tenants.as_slice() {
            [one] => store.dead_letter(one, &id)?,
            _ => None,
        };
        Ok::<_, tai_store::StoreError>((tenants.len(), letter))
    })
    .await;
    let letter = match found {
        Ok(Ok((1, Some(letter)))) => letter,
        Ok(Ok((0 | 1, _))) => {
            return error(ErrorCode::NotFound, format!("no dead letter {signal_id:?}"))
        }
        Ok(Ok(_)) => {
            return error(
                ErrorCode::InvalidRequest,
                format!("{signal_id:?} is dead-lettered for several tenants: add ?tenant="),
            )
        }
        Ok(Err(e)) => return error(ErrorCode::Internal, e.to_string()),
        Err(r) => return r,
    };
    let tenant_id = letter.signal.tenant_id.clone();
    if let Some(why) = replay_refused(state, &letter.signal).await {
        return error(ErrorCode::Conflict, why);
    }
    let signal_id = signal_id.to_string();
    match call(KANBAN_QUEUE, |reply| KanbanMsg::Replay {
        tenant_id: tenant_id.clone(),
        signal_id: signal_id.clone(),
        reply,
    })
    .await
    {
        Ok(ReplayOutcome::Queued) => {
            tracing::info!(tenant = %tenant_id, signal = %signal_id, reason = %letter.reason, "dead letter replayed: queued again");
            json_reply(
                StatusCode::ACCEPTED,
                &json!({"signal_id": signal_id, "tenant_id": tenant_id, "status": "accepted", "replayed": true}),
            )
        }
        // Replayed meanwhile by another request.
        Ok(ReplayOutcome::NotFound(e)) => error(ErrorCode::NotFound, e),
        Ok(ReplayOutcome::Failed(e)) => {
            tracing::error!(tenant = %tenant_id, signal = %signal_id, error = %e, "dead letter replay failed");
            error(
                ErrorCode::Internal,
                format!("the replay failed: {e} (once the node runs again, the letter is either still listed or its signal queued)"),
            )
        }
        Err(r) => r,
    }
}

/// Why a replay of `signal` would only dead-letter it again, if it would:
/// its SKU is not configured, or its engine is halted, out of quota, or
/// degraded (for a signal that is not critical). The operator is told what
/// to do first instead of getting a second dead letter.
async fn replay_refused(state: &NodeState, signal: &Signal) -> Option<String> {
    let (t, s) = (&signal.tenant_id, &signal.sku_id);
    if !state.config.skus.contains_key(s) {
        return Some(format!(
            "SKU {s:?} is not in the configuration: the signal would be dead-lettered again (unknown_sku)"
        ));
    }
    // A router that cannot answer now (restarting) does not hold the
    // replay up: at worst the signal is dead-lettered again.
    let info = call(ENGINE_ROUTER, |reply| RouterMsg::Engine {
        tenant_id: t.clone(),
        sku_id: s.clone(),
        reply,
    })
    .await
    .ok()??;
    let resume = format!("resume it first (POST /admin/tenants/{t}/{s}/resume)");
    match info.state {
        EngineState::Halted => Some(format!("engine {t}/{s} is halted: {resume}")),
        EngineState::QuotaExhausted => Some(format!("engine {t}/{s} is out of quota: {resume}")),
        EngineState::Degraded if !signal.critical => Some(format!(
            "engine {t}/{s} is degraded (no entitlement): only critical signals are decided; send its entitlement first"
        )),
        _ => None,
    }
}

/// The reason of `POST .../halt`: `{"reason": "..."}`, or no body at all.
fn halt_reason(body: &[u8]) -> Result<String, Response> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Halt {
        reason: Option<String>,
    }
    let bad = |why: String| error(ErrorCode::InvalidRequest, why);
    if body.trim_ascii().is_empty() {
        return Ok("operator halt".into());
    }
    let halt: Halt = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body must be {{\"reason\": \"...\"}}: {e}")))?;
    match halt.reason {
        None => Ok("operator halt".into()),
        Some(r) if r.trim().is_empty() => Err(bad("reason must not be empty".into())),
        Some(r) => Ok(r),
    }
}

/// A whole-number query parameter, `default` when absent.
fn num(query: &HashMap<String, String>, key: &str, default: u64) -> Result<u64, Response> {
    match query.get(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            error(
                ErrorCode::InvalidRequest,
                format!("{key} must be a whole number"),
            )
        }),
    }
}

/// `limit=` (1..=1000, default 100) and `tenant=` (empty = all).
fn page(query: &HashMap<String, String>) -> Result<(usize, Option<&str>), Response> {
    let limit = num(query, "limit", 100)?.clamp(1, 1000) as usize;
    let tenant = query
        .get("tenant")
        .map(String::as_str)
        .filter(|t| !t.is_empty());
    Ok((limit, tenant))
}

/// Runs `f`, which reads through the store (a ledger of millions of
/// receipts takes seconds), on tokio's blocking pool: the node has two
/// async workers, and the signal path needs them.
/// Gives out `read` (an answer read from the store) once what it read is
/// on disk. A read sees writes still in a group flush, which a crash or a
/// failed flush takes back: a receipt given out that the ledger then loses
/// (and writes again, differently, under the same seq) would be a fork of
/// the chain in an auditor's hands. A failed read is answered at once.
async fn settled(store: &tai_store::Store, read: Response) -> Response {
    if read.status() != StatusCode::OK {
        return read;
    }
    match store.durable().await {
        Ok(()) => read,
        Err(e) => error(ErrorCode::Internal, format!("store: {e}")),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(ErrorCode::Internal, format!("the store read failed: {e}")))
}

/// `after={tenant}/{second}`, where a page ends: `what` says what the two
/// are (`{tenant}/{sku}: the last engine`).
fn after_pair<'q>(
    query: &'q HashMap<String, String>,
    what: &str,
) -> Result<Option<(&'q str, &'q str)>, Response> {
    match query.get("after").map(|a| a.split_once('/')) {
        None => Ok(None),
        Some(Some((t, x))) if !t.is_empty() && !x.is_empty() => Ok(Some((t, x))),
        Some(_) => Err(error(
            ErrorCode::InvalidRequest,
            format!("after must be {what} of the page before"),
        )),
    }
}

/// How many engines `GET /admin/tenants` asks the router for at a time.
const ENGINE_PAGE: usize = 1000;

/// `GET /admin/tenants`: every engine by tenant then SKU (SPEC), or with
/// `limit=` (1..=1000) a page of them after `after={tenant}/{sku}`;
/// `state=halted` keeps those in that state (where the board only counts
/// them). Read from the router a page at a time: an answer of one page is
/// sent whole; a longer one is streamed as the pages come (each sent
/// before the next is read), so listing any number of engines holds about
/// one page. An error before the first page is an error JSON; one after it
/// can only cut the stream (logged), which a client sees as a body that
/// ends early.
async fn tenants(query: &HashMap<String, String>) -> Result<Response, Response> {
    let wanted = match query.get("state") {
        None => None,
        Some(s) => match EngineState::ALL.into_iter().find(|e| e.as_str() == s) {
            Some(state) => Some(state),
            None => {
                let all: Vec<&str> = EngineState::ALL.iter().map(|e| e.as_str()).collect();
                return Err(error(
                    ErrorCode::InvalidRequest,
                    format!("state must be one of {}, not {s:?}", all.join(", ")),
                ));
            }
        },
    };
    let limit = match query.get("limit") {
        None => usize::MAX,
        Some(_) => num(query, "limit", 0)?.clamp(1, 1000) as usize,
    };
    let after = after_pair(query, "{tenant}/{sku}: the last engine")?
        .map(|(t, s)| (t.to_string(), s.to_string()));
    let mut list = EngineList {
        wanted,
        limit,
        after,
        listed: 0,
        done: false,
    };
    let mut first = b"[".to_vec();
    first.extend(list.next_chunk().await?);
    let json = |body: Response| {
        warp::reply::with_header(body, warp::http::header::CONTENT_TYPE, "application/json")
            .into_response()
    };
    if list.done {
        return Ok(json(Response::new(first.into())));
    }
    // One chunk ahead at most: the next page is read once this one is taken.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let _ = tx.try_send(Ok(first));
    tokio::spawn(async move {
        while !list.done {
            let chunk = list.next_chunk().await.map_err(|r| {
                tracing::warn!(status = %r.status(), listed = list.listed, "the engine list stopped part way: its answer is cut");
                std::io::Error::other("the engine list stopped part way")
            });
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    let body = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok(json(warp::reply::stream(body).into_response()))
}

/// Where a `GET /admin/tenants` answer has got to.
struct EngineList {
    wanted: Option<EngineState>,
    limit: usize,
    after: Option<(String, String)>,
    listed: usize,
    done: bool,
}

impl EngineList {
    /// The JSON of the next router page's engines, after a comma once any
    /// were listed (the last chunk closes the array; a page may add none).
    async fn next_chunk(&mut self) -> Result<Vec<u8>, Response> {
        let mut chunk = Vec::new();
        // Unfiltered, no more than the answer still needs (every live
        // engine on a page is asked).
        let want = match self.wanted {
            None => ENGINE_PAGE.min(self.limit - self.listed),
            Some(_) => ENGINE_PAGE,
        };
        let page = call(ENGINE_ROUTER, |reply| RouterMsg::Engines {
            after: self.after.take(),
            limit: want,
            reply,
        })
        .await?
        .map_err(|e| error(ErrorCode::Internal, e))?;
        for e in page
            .engines
            .iter()
            .filter(|e| self.wanted.is_none_or(|s| e.state == s))
        {
            if self.listed > 0 {
                chunk.push(b',');
            }
            serde_json::to_writer(&mut chunk, e)
                .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
            self.listed += 1;
            if self.listed == self.limit {
                break;
            }
        }
        self.after = page.next;
        self.done = self.listed == self.limit || self.after.is_none();
        if self.done {
            chunk.push(b']');
        }
        Ok(chunk)
    }
}

fn receipts(store: &tai_store::Store, query: &HashMap<String, String>) -> Response {
    let (after, (limit, tenant)) =
        match num(query, "after_seq", 0).and_then(|a| Ok((a, page(query)?))) {
            Ok(v) => v,
            Err(r) => return r,
        };
    match store.receipts(after, limit, tenant) {
        Ok(list) => json_reply(StatusCode::OK, &list),
        Err(e) => error(ErrorCode::Internal, e.to_string()),
    }
}

/// `after={tenant}/{signal_id}`: the last letter of the page before
/// (tenant names have no `/`).
fn dead_letters(store: &tai_store::Store, query: &HashMap<String, String>) -> Response {
    let (limit, tenant) = match page(query) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let after = match after_pair(query, "{tenant}/{signal_id}: the last letter") {
        Ok(after) => after,
        Err(r) => return r,
    };
    match store.dead_letters(tenant, after, limit) {
        Ok(letters) => json_reply(StatusCode::OK, &letters),
        Err(e) => error(ErrorCode::Internal, format!("store: {e}")),
    }
}
