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
    #[error("request body not received within {0} s of its headers")]
    TimedOut(u64),
}

/// Reads a request body, stopping as soon as it passes `limit` bytes, with or
/// without a Content-Length (chunked bodies are capped the same way). One
/// whose Content-Length is already over the limit is refused before any of
/// it is read: the client is not kept sending what will be refused. One
/// that has not all arrived `timeout` after its headers is given up
/// (`408`): a client that stops half-way through its body would otherwise
/// hold its connection, and a place under `node.max_connections`, for ever.
pub async fn read_body_capped<S, B>(
    headers: &warp::http::HeaderMap,
    stream: S,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, BodyError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let declared = headers
        .get(warp::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    tokio::time::timeout(timeout, read_capped(stream, limit))
        .await
        .unwrap_or(Err(BodyError::TimedOut(timeout.as_secs())))
}

async fn read_capped<S, B>(stream: S, limit: usize) -> Result<Bytes, BodyError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    futures::pin_mut!(stream);
    // A body that comes in one chunk, as a signal's does, is kept as it
    // came (for `Bytes`, without a copy); only a second chunk makes the
    // body be gathered into a buffer of its own.
    let mut first: Option<Bytes> = None;
    let mut out = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
        let read = first.as_ref().map_or(0, Bytes::len) + out.len();
        if read + chunk.remaining() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        if first.is_none() && out.is_empty() {
            first = Some(chunk.copy_to_bytes(chunk.remaining()));
            continue;
        }
        if let Some(first) = first.take() {
            out.extend_from_slice(&first);
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(first.unwrap_or_else(|| out.freeze()))
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
            BodyError::TimedOut(_) => error_reply(ErrorCode::RequestTimeout, self.to_string()),
        }
    }
}

/// What a listener takes: how long a request's headers may take, and how
/// many connections it holds at once.
#[derive(Clone, Copy, Debug)]
pub struct Listening {
    /// The listener's name in its logs and in
    /// `tai_http_connections{listener}`: `ingress`, `operator`.
    pub name: &'static str,
    /// `node.header_read_timeout_secs`.
    pub header_timeout: std::time::Duration,
    /// `node.max_connections`, as the open-file limit allows (tai-node).
    pub max_connections: usize,
}

impl Listening {
    /// Listener `name` as the node's config sets it up.
    pub fn new(name: &'static str, node: &tai_core::config::NodeConfig) -> Listening {
        Listening {
            name,
            header_timeout: std::time::Duration::from_secs(node.header_read_timeout_secs),
            max_connections: node.max_connections,
        }
    }
}

/// Serves `service` (a filter's `warp::service(..)`) on `listener` over
/// HTTP/1.1 until `shutdown` resolves, then lets the requests under way
/// finish, as `warp::serve(..).incoming(..).graceful(..)` did, but:
///
/// - with hyper's header read timeout set: a connection whose request
///   headers have not all arrived `header_timeout` after it began waiting
///   for them is closed, an idle keep-alive connection and one that never
///   sent a byte too. Without it a client that opened connections and sent
///   nothing, or a header a byte a minute, held them, and the node's file
///   descriptors, for ever. (warp's own server reads the first bytes to
///   choose between HTTP/1 and HTTP/2 with no timeout at all.)
/// - with at most `max_connections` open: at the bound the listener stops
///   accepting until one closes (the kernel's backlog holds the next ones),
///   as ranch's `max_connections` does, and warns (at most once a minute,
///   with how often it got there). A flood of connections then waits
///   instead of taking every file descriptor the process may open, which
///   the store needs too (a store that cannot open a file fails, and the
///   node stops).
/// - with half-closed connections allowed: a request whose client shuts
///   its side for writing once it has sent it (as HTTP/1.1 lets it) is
///   answered, and a request is not watched for the client's end of
///   stream while it is handled. That watch (hyper's default) read the
///   socket once more during every request, into a fresh 8 KiB buffer:
///   the request's headers still held the one they were read into. A
///   client gone before its answer is known when the answer's write
///   fails; a signal it sent is kept either way (the queue has it).
pub async fn serve<S>(
    service: S,
    listener: tokio::net::TcpListener,
    limits: Listening,
    shutdown: impl std::future::Future<Output = ()>,
) where
    S: tower_service::Service<
            warp::http::Request<hyper::body::Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let open = metrics::gauge!(tai_core::telemetry::HTTP_CONNECTIONS, "listener" => limits.name);
    open.set(0.0);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let max = limits.max_connections.max(1);
    // Whether the last pass was at the bound, how often the bound was
    // reached since the last warning, and when that was: a listener held
    // at its bound reaches it again at every connection that closes, and
    // is told of once a minute, not each time.
    let (mut at_bound, mut reached, mut warned) = (false, 0u64, None::<std::time::Instant>);
    loop {
        let room = connections.len() < max;
        if !room && !at_bound {
            reached += 1;
            if warned.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
                tracing::warn!(
                    listener = limits.name,
                    max_connections = max,
                    times = reached,
                    "connections at node.max_connections: new ones wait until one closes"
                );
                (reached, warned) = (0, Some(std::time::Instant::now()));
            }
        }
        at_bound = !room;
        let stream = tokio::select! {
            accepted = listener.accept(), if room => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            // Finished connections are reaped as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => {
                open.set(connections.len() as f64);
                continue;
            }
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(service.clone());
        let mut stopping = stopping.clone();
        let header_timeout = limits.header_timeout;
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .half_close(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = async { drop(stopping.wait_for(|s| *s).await) } => {
                    // Ends once the request under way (if any) is answered.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection closed with an error");
            }
        });
        open.set(connections.len() as f64);
    }
    drop(listener);
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {
        open.set(connections.len() as f64);
    }
}

/// A failed accept: a connection that went away before it was taken is
/// nothing; anything else (out of file descriptors) is logged, and the
/// listener waits a second rather than spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, warp::Error>> {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn a_body_in_one_chunk_is_kept_without_a_copy() {
        static BODY: &[u8] = br#"{"signal_id":"s1"}"#;
        let read = read_capped(chunks(&[BODY]), 64).await.unwrap();
        assert_eq!(read, BODY);
        assert_eq!(read.as_ptr(), BODY.as_ptr(), "the chunk itself, not a copy");
    }

    #[tokio::test]
    async fn a_body_in_several_chunks_is_gathered_in_order() {
        let cases: [&[&'static [u8]]; 4] = [
            &[b"{\"a\":", b"1", b"}"],
            &[b"", b"{\"a\":1}"],
            &[b"", b"", b"{\"a\":", b"1}"],
            &[b"{\"a\":1}", b""],
        ];
        for parts in cases {
            let read = read_capped(chunks(parts), 64).await.unwrap();
            assert_eq!(read, &b"{\"a\":1}"[..], "{parts:?}");
        }
        assert!(read_capped(chunks(&[]), 64).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_whichever_chunk_passes_it() {
        for parts in [
            &[b"0123456789".as_slice()][..],
            &[b"01234", b"56789"],
            &[b"0123", b"4567", b"89"],
        ] {
            assert!(
                matches!(
                    read_capped(chunks(parts), 9).await,
                    Err(BodyError::TooLarge(9))
                ),
                "{parts:?}"
            );
        }
        assert_eq!(
            read_capped(chunks(&[b"01234", b"5678"]), 9).await.unwrap(),
            &b"012345678"[..]
        );
    }

    /// The client sends its request and shuts its side for writing before
    /// the server reads a byte. The request is exactly as long as hyper's
    /// first read (8 KiB), so nothing tells the server the socket is empty
    /// (tokio takes a short read as that), and a read while the request is
    /// handled finds the end of stream. With hyper's default (no half
    /// close) that read closed the connection unanswered.
    #[tokio::test]
    async fn a_request_whose_client_has_shut_its_side_for_writing_is_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use warp::Filter;
        const FIRST_READ: usize = 8192;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let head =
            |n: usize| format!("POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: {n}\r\n\r\n");
        let body_len = FIRST_READ - head(FIRST_READ).len();
        let mut request = head(body_len).into_bytes();
        assert_eq!(request.len() + body_len, FIRST_READ);
        request.resize(FIRST_READ, b'x');
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let route = warp::body::bytes().map(|b: Bytes| format!("got {}", b.len()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let limits = Listening {
            name: "test",
            header_timeout: std::time::Duration::from_secs(5),
            max_connections: 4,
        };
        let server = tokio::spawn(serve(warp::service(route), listener, limits, async {
            let _ = stopped.await;
        }));
        let mut answer = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_to_string(&mut answer),
        )
        .await
        .expect("the server answers and closes")
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(
            answer.ends_with(&format!("\r\n\r\ngot {body_len}")),
            "{answer:?}"
        );
        let _ = stop.send(());
        server.await.unwrap();
    }
}
