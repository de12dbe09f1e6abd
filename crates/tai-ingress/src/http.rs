//! HTTP pieces every TAI listener shares: a body reader with a hard cap, and
//! replies in the contract's JSON shapes. The operator API (tai-node) uses
//! them too, so every error everywhere has one shape.

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tai_core::{ApiError, ErrorCode};
use warp::http::{Method, StatusCode};
use warp::reply::Response;
use warp::Reply;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body over {0} bytes")]
    TooLarge(usize),
    #[error("request body could not be read: {0}")]
    Read(String),
}

/// Reads a request body, stopping as soon as it passes `limit` bytes, with or
/// without a Content-Length (chunked bodies are capped the same way).
pub async fn read_body_capped<S, B>(stream: S, limit: usize) -> Result<Bytes, BodyError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    futures::pin_mut!(stream);
    let mut out = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        if out.len() + chunk.remaining() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
}

pub fn json_reply(status: StatusCode, body: &impl Serialize) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// `{"error": {"code", "message"}}` with the code's status.
pub fn error_reply(code: ErrorCode, message: impl Into<String>) -> Response {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_reply(status, &ApiError::new(code, message))
}

/// A path segment as the client meant it: clients percent-encode what
/// they put in a path (`encodeURIComponent` turns the `:` ids may hold into
/// `%3A`); the signature covers the path as sent.
pub fn decode_segment(s: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy()
}

/// Whether a request with `method` is served by an endpoint that takes
/// `takes`: HEAD is a GET without its body (hyper leaves the body out).
pub fn answers(method: &Method, takes: &Method) -> bool {
    method == takes || (*method == Method::HEAD && *takes == Method::GET)
}

/// `405` for a path asked with a method it does not take, with `Allow`.
pub fn method_not_allowed(method: &Method, path: &str, takes: &Method) -> Response {
    let mut r = error_reply(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not supported on {path} (use {takes})"),
    );
    r.headers_mut().insert(
        warp::http::header::ALLOW,
        warp::http::HeaderValue::from_str(takes.as_str()).expect("a method name"),
    );
    r
}

impl BodyError {
    pub fn reply(&self) -> Response {
        match self {
            BodyError::TooLarge(_) => error_reply(ErrorCode::PayloadTooLarge, self.to_string()),
            BodyError::Read(_) => error_reply(ErrorCode::InvalidSignal, self.to_string()),
        }
    }
}
