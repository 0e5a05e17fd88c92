//! Connection: one accepted socket, from hyper's request parsing to the hand-over of an SSE stream
//! or to the close.
//!
//! Owns the driver around hyper's HTTP/1.1 connection and the edge bounds of PROTOCOL §9 that hyper
//! does not answer as the protocol wants. Every request is parsed, routed and answered by hyper;
//! when the answer is an accepted stream, hyper writes the response head, the body offers its
//! stream at the [`Handoff`], and once the head is flushed the driver takes the socket back
//! (`Connection::into_parts`) and spawns the stream's [`writer`](crate::writer) on it. The hyper
//! connection, its two 8 KiB buffers and its task are freed then; an idle stream is left costing
//! only its writer task, its registry entry and its socket.
//!
//! The edge bounds:
//! - **Request head**: the IO wrapper lets hyper buffer at most `MAX_HEADER_BYTES` + [`HEAD_SLACK`]
//!   bytes of a head; past that the driver answers 431 (or 414) in JSON itself. Within that, `Edge`
//!   measures the parsed head against `MAX_HEADER_BYTES` before routing, so no callback is made.
//! - **Header read timeout**: hyper's own (30 s from accept or from the end of the previous
//!   response); hyper closes silently, the driver answers 408 in JSON first.
//! - **Lingering close**: whenever the gateway, not the client, ends the connection (an early
//!   answer to a request whose body was not read, `Connection: close`, a refusal above, shutdown),
//!   the driver shuts down its write side and reads and discards what the client still sends, up to
//!   `MAX_SEND_BYTES` + 1 MiB and [`LINGER_TIME`], so the answer is not destroyed by a reset.
//!
//! It also passes the drain signal on to hyper (graceful shutdown of keep-alive connections). It must
//! not route or write frames.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};

use crate::body::{Handoff, ResponseBody};
use crate::config::Config;
use crate::gateway::Gateway;
use crate::routes::{request_target, Listener, Routes};
use crate::writer::StreamWriter;
use crate::{log, log::Level};

/// PROTOCOL §9: a request head must be complete 30 s after the connection was accepted or after the
/// previous response was written (hyper's header read timeout, which covers both).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes past `MAX_HEADER_BYTES` that hyper may buffer before the driver refuses the head itself.
/// Heads up to the bound plus this reach the `Edge` service, which measures them as sent (exactly
/// for the usual `name: value` form); the slack also lets the driver see where a long request
/// target ends, to tell 414 from 431. Cost: a big head's buffer is 1 KiB larger while it is parsed.
pub const HEAD_SLACK: usize = 1024;
/// How long a lingering close may read and discard (nginx's `lingering_time`, shortened: the
/// longest answer we give before the body is read is tiny, and a client writing its body at less
/// than `MAX_SEND_BYTES`/2 s is too slow to wait for).
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// Once shutdown has begun, a lingering close ends this soon, so the drain is not held up.
const DRAIN_LINGER: Duration = Duration::from_millis(250);
/// Discard buffer of a lingering close: heap-allocated only while lingering.
const LINGER_CHUNK: usize = 16 * 1024;
/// Longest read hyper is given while it reads a head (a stack buffer; a head needs few reads).
const STAGING: usize = 8 * 1024;
/// Bound on writing one of the driver's own refusals (they are < 200 B and fit any socket buffer).
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// hyper's settings for every connection, from the configuration.
pub fn http1_builder(config: &Config) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new());
    http.header_read_timeout(HEADER_READ_TIMEOUT);
    // hyper answers a head that outgrows its buffer with a bare 431 (no JSON body). The IO wrapper
    // normally stops a head at MAX_HEADER_BYTES + HEAD_SLACK first; this backstop only matters for
    // a pipelined head, parts of which hyper read while the previous request was being served.
    // The buffer only grows this large for a head (or body read) that needs it.
    http.max_buf_size(((config.max_header_bytes + HEAD_SLACK) * 2).max(8192));
    http
}

/// The answers of the edge bounds (PROTOCOL §9), each followed by closing the connection: given
/// by the driver before any route runs, and by the routes for a body too large or too slow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    UriTooLong,
    HeadTooLarge,
    Timeout,
    PayloadTooLarge,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
            Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::Timeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    fn body(self) -> &'static str {
        match self {
            Refusal::UriTooLong => r#"{"error":"URI too long"}"#,
            Refusal::HeadTooLarge => r#"{"error":"Request header fields too large"}"#,
            Refusal::Timeout => r#"{"error":"Request timeout"}"#,
            Refusal::PayloadTooLarge => r#"{"error":"Payload too large"}"#,
        }
    }

    /// As an answer hyper writes (the connection closes after it).
    pub(crate) fn answer(self) -> Response<ResponseBody> {
        let body = Bytes::from_static(self.body().as_bytes());
        let mut answer = Response::new(ResponseBody::Full(Some(body)));
        *answer.status_mut() = self.status();
        let headers = answer.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        answer
    }

    /// As bytes the driver writes itself, when hyper has given up on the connection.
    fn raw(self) -> Vec<u8> {
        let status = self.status();
        let body = self.body();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len(),
        )
        .into_bytes()
    }

    /// For a head that outgrew what hyper may buffer: 414 when the request target alone is over
    /// `bound`, else 431. `buffered` is what hyper had read of the head.
    fn for_buffered_head(buffered: &[u8], bound: usize) -> Refusal {
        let start = buffered
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(buffered.len());
        let line = &buffered[start..];
        let Some(method_end) = line.iter().position(|&b| b == b' ') else {
            return Refusal::HeadTooLarge;
        };
        let target = &line[method_end + 1..];
        let target_len = target
            .iter()
            .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
            .unwrap_or(target.len());
        if target_len > bound {
            Refusal::UriTooLong
        } else {
            Refusal::HeadTooLarge
        }
    }
}

/// Checks a parsed head against `bound`, measured as the client sent it: the request line
/// (`METHOD SP target SP HTTP/1.x CRLF`), one `name: value CRLF` per field line (hyper keeps each
/// repeated field separately), and the final CRLF. Exact for the usual one-space form; a client
/// that writes `name:value` is counted one byte more per line, one that pads with more spaces or
/// sends empty lines before the request line is counted less (the IO wrapper still stops it at
/// `bound + HEAD_SLACK`).
fn head_refusal(request: &Request<Incoming>, bound: usize) -> Option<Refusal> {
    let target = request_target(request.uri()).len();
    if target > bound {
        return Some(Refusal::UriTooLong);
    }
    let line = request.method().as_str().len() + 1 + target + 1 + "HTTP/1.1\r\n".len();
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    (line + fields + 2 > bound).then_some(Refusal::HeadTooLarge)
}

/// Shared by [`Edge`] and [`EdgeIo`]: whether a request is being served, and how many bytes hyper
/// has read since the last one was (those belong to the next head, or to a body being drained).
#[derive(Default)]
struct HeadBudget {
    serving: AtomicBool,
    read: AtomicUsize,
}

/// The service hyper calls: the head bound, then [`Routes`].
struct Edge {
    routes: Routes,
    head: Arc<HeadBudget>,
    max_header_bytes: usize,
}

impl Service<Request<Incoming>> for Edge {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Served;

    fn call(&self, request: Request<Incoming>) -> Served {
        self.head.serving.store(true, Relaxed);
        let inner = match head_refusal(&request, self.max_header_bytes) {
            Some(refusal) => {
                log!(Level::Debug, "request head refused: {refusal:?}");
                Inner::Refused(Some(refusal.answer()))
            }
            None => Inner::Routed(self.routes.call(request)),
        };
        Served {
            inner,
            head: self.head.clone(),
        }
    }
}

type RoutesFuture = <Routes as Service<Request<Incoming>>>::Future;

/// A request's answer; when it is ready the head budget starts over for the next request.
struct Served {
    inner: Inner,
    head: Arc<HeadBudget>,
}

enum Inner {
    Refused(Option<Response<ResponseBody>>),
    Routed(RoutesFuture),
}

impl Future for Served {
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let answer = match &mut this.inner {
            Inner::Routed(routed) => ready!(routed.as_mut().poll(cx))?,
            Inner::Refused(answer) => answer.take().expect("Served polled after completion"),
        };
        this.head.read.store(0, Relaxed);
        this.head.serving.store(false, Relaxed);
        Poll::Ready(Ok(answer))
    }
}

/// hyper's IO: the socket, the head bound on reads, and write bookkeeping for the [`Handoff`].
struct EdgeIo {
    io: TokioIo<TcpStream>,
    handoff: Arc<Handoff>,
    head: Arc<HeadBudget>,
    /// `MAX_HEADER_BYTES` + [`HEAD_SLACK`].
    head_limit: usize,
    /// Reading stopped because a head passed `head_limit`.
    overflowed: bool,
    /// The client closed its side between requests.
    eof: bool,
}

impl EdgeIo {
    fn record<T>(&self, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.handoff.wrote(poll.is_pending());
        poll
    }
}

impl Read for EdgeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.head.serving.load(Relaxed) {
            // A body being read by its route, which bounds it.
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        // A head (or the drain of an unread body, which hyper tries once): never let hyper hold
        // more than `head_limit` bytes of it. Copied through a stack buffer, so this stays safe code.
        let read = this.head.read.load(Relaxed);
        let allowance = this.head_limit.saturating_sub(read);
        if allowance == 0 {
            this.overflowed = true;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head over MAX_HEADER_BYTES",
            )));
        }
        let want = allowance.min(buf.remaining()).min(STAGING);
        let mut staging = [0u8; STAGING];
        let socket = this.io.inner();
        loop {
            ready!(socket.poll_read_ready(cx))?;
            match socket.try_read(&mut staging[..want]) {
                Ok(n) => {
                    buf.put_slice(&staging[..n]);
                    this.head.read.store(read + n, Relaxed);
                    this.eof |= n == 0 && want > 0;
                    return Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

impl Write for EdgeIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.record(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.record(poll)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves one accepted socket until it closes or its stream is handed to a writer.
pub async fn serve(
    socket: TcpStream,
    gateway: Arc<Gateway>,
    listener: Listener,
    http: http1::Builder,
    mut drain: watch::Receiver<bool>,
) {
    let max_header_bytes = gateway.config.max_header_bytes;
    let linger_bytes = gateway.config.max_send_bytes.saturating_add(1 << 20);
    let handoff = Arc::new(Handoff::default());
    let head = Arc::new(HeadBudget::default());
    let edge = Edge {
        routes: Routes::new(gateway, listener, handoff.clone()),
        head: head.clone(),
        max_header_bytes,
    };
    let io = EdgeIo {
        io: TokioIo::new(socket),
        handoff: handoff.clone(),
        head,
        head_limit: max_header_bytes + HEAD_SLACK,
        overflowed: false,
        eof: false,
    };
    let mut conn = http.serve_connection(io, edge);
    let mut draining = *drain.borrow_and_update();
    if draining {
        Pin::new(&mut conn).graceful_shutdown();
    }
    let result = loop {
        // Without shutdown: the driver decides how the socket is closed (see `close`).
        let step = poll_fn(|cx| match conn.poll_without_shutdown(cx) {
            Poll::Ready(result) => Poll::Ready(Some(result)),
            Poll::Pending if handoff.ready() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        });
        tokio::select! {
            biased;
            done = step => match done {
                Some(result) => break result,
                None => {
                    let offer = handoff.take().expect("ready() saw an offer");
                    // Bytes the client sent after its request (a pipelined request) are dropped
                    // with hyper's read buffer: an SSE response never ends in a way that would let
                    // them be answered.
                    let socket = conn.into_parts().io.io.into_inner();
                    tokio::spawn(StreamWriter::new(socket, offer.guard, offer.chunked, drain));
                    return;
                }
            },
            _ = drain.changed(), if !draining => {
                draining = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    let parts = conn.into_parts();
    let EdgeIo {
        io,
        overflowed,
        eof,
        ..
    } = parts.io;
    let mut socket = io.into_inner();
    let refusal = match &result {
        Ok(()) => None,
        Err(err) if err.is_timeout() => Some(Refusal::Timeout),
        Err(_) if overflowed => Some(Refusal::for_buffered_head(
            &parts.read_buf,
            max_header_bytes,
        )),
        Err(err) => {
            log!(Level::Debug, "connection ended with error: {err}");
            None
        }
    };
    if let Some(refusal) = refusal {
        log!(Level::Debug, "connection refused by the edge: {refusal:?}");
        // The client may have stopped reading; the answer is a courtesy, not owed.
        let _ = timeout(REFUSAL_WRITE_TIMEOUT, socket.write_all(&refusal.raw())).await;
    }
    // A client that closed first has nothing left in flight: close at once.
    if !eof {
        linger(socket, linger_bytes, &mut drain).await;
    }
}

/// Lingering close: FIN our side, then read and discard what the client still sends (it may be
/// writing a body it thinks we want) until it closes, `max_bytes` were discarded or
/// [`LINGER_TIME`] passed ([`DRAIN_LINGER`] once shutdown began). Closing with unread bytes in
/// the receive queue would send a reset, which can destroy our answer before the client reads it.
async fn linger(mut socket: TcpStream, max_bytes: usize, drain: &mut watch::Receiver<bool>) {
    if SockRef::from(&socket).shutdown(Shutdown::Write).is_err() {
        return;
    }
    let now = Instant::now();
    let mut draining = *drain.borrow();
    let mut deadline = now + if draining { DRAIN_LINGER } else { LINGER_TIME };
    let mut sink = vec![0u8; LINGER_CHUNK];
    let mut left = max_bytes;
    while left > 0 {
        tokio::select! {
            read = timeout_at(deadline, socket.read(&mut sink)) => match read {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                // Closed, failed or out of time.
                _ => return,
            },
            _ = drain.changed(), if !draining => {
                draining = true;
                deadline = deadline.min(Instant::now() + DRAIN_LINGER);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_buffered_head_is_414_only_when_its_target_is_over() {
        let bound = 16;
        let refusal = |head: &[u8]| Refusal::for_buffered_head(head, bound);
        assert_eq!(refusal(b"GET /aaaaaaaaaaaaaaaa"), Refusal::UriTooLong);
        assert_eq!(refusal(b"\r\nGET /aaaaaaaaaaaaaaa"), Refusal::HeadTooLarge);
        assert_eq!(
            refusal(b"GET /aaaaaaaaaaaaaaa HTTP/1.1\r\nx: y"),
            Refusal::HeadTooLarge
        );
        assert_eq!(
            refusal(b"GET /aaaaaaaaaaaaaaaa HTTP/1.1\r\n"),
            Refusal::UriTooLong
        );
        assert_eq!(refusal(b"GETGETGETGETGETGETGET"), Refusal::HeadTooLarge);
    }

    #[test]
    fn raw_refusals_are_complete_json_answers() {
        let raw = String::from_utf8(Refusal::Timeout.raw()).unwrap();
        assert_eq!(
            raw,
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: 27\r\nconnection: close\r\n\r\n{\"error\":\"Request timeout\"}"
        );
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
