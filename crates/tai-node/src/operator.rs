//! The operator API (SPEC §4) on `operator.listen`: health, readiness, the
//! live tree, fault injection and shutdown. `/admin` needs the bearer token.
//!
//! One warp filter gathers the request and a plain `match` routes it, so
//! every answer, errors included, is the contract's JSON.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tai_core::ErrorCode;
use tai_ingress::http::{error_reply as error, json_reply, read_body_capped};
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::node::NodeState;

const MAX_ADMIN_BODY: usize = 64 * 1024;

pub fn routes(
    state: Arc<NodeState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method: Method, path: warp::path::FullPath, headers: HeaderMap, body| {
                let state = state.clone();
                async move {
                    match read_body_capped(body, MAX_ADMIN_BODY).await {
                        Ok(_body) => route(&state, &method, path.as_str(), &headers).await,
                        Err(e) => e.reply(),
                    }
                }
            },
        )
        .recover(|_: warp::Rejection| async {
            Ok::<_, Infallible>(error(ErrorCode::InvalidSignal, "malformed request"))
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

async fn route(state: &NodeState, method: &Method, path: &str, headers: &HeaderMap) -> Response {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["health"]) => json_reply(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, ["ready"]) => match state.not_ready().await {
            None => json_reply(StatusCode::OK, &json!({"ready": true})),
            Some(reason) => json_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "reason": reason}),
            ),
        },
        (_, ["admin", ..]) if !authorized(state, headers) => {
            error(ErrorCode::Unauthorized, "missing or invalid admin token")
        }
        (&Method::GET, ["admin", "tree"]) => {
            let tree = tai_otp::tree(&state.root, Duration::from_secs(2), &|_| None).await;
            json_reply(StatusCode::OK, &tree)
        }
        (&Method::POST, ["admin", "actors", name, "kill"]) => kill(state, name),
        (&Method::POST, ["admin", "shutdown"]) => {
            state.request_shutdown("POST /admin/shutdown");
            json_reply(StatusCode::ACCEPTED, &json!({"status": "shutting_down"}))
        }
        (_, ["health"] | ["ready"] | ["admin", "tree"] | ["admin", "shutdown"])
        | (_, ["admin", "actors", _, "kill"]) => error(
            ErrorCode::NotFound,
            format!("{method} is not supported on {path}"),
        ),
        _ => error(ErrorCode::NotFound, format!("no such endpoint: {path}")),
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
    let name = percent_decode(name);
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

/// Engine names carry `:`, which clients may send percent-encoded.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}
