//! Callbacks: the gateway's HTTP client to the backend (PROTOCOL §2 connect, §5 disconnect, §9).
//!
//! Owns the request bodies' JSON, the pooled keep-alive client, the concurrency bounds, the
//! disconnect queue and its retries, the timeout and the classification of outcomes. It decides
//! nothing about streams: the caller turns an outcome into a response or a log line. Redirects are
//! never followed (hyper's client does not follow them; a 3xx is an outcome like any other status).
//!
//! Two bounds, one per action, each `CALLBACK_CONCURRENCY`:
//! - **connect**: a semaphore. A browser is waiting on each one, so a connect waits for a slot, and
//!   its caller gives up waiting when the client leaves (see [`Callbacks::connect_slot`]).
//! - **disconnect**: a FIFO of ended streams drained by at most `CALLBACK_CONCURRENCY` worker tasks,
//!   spawned while there is work and gone when the queue is empty. A disconnect is never dropped for
//!   being queued behind others; its memory is the stream's request copy (bounded by
//!   `MAX_HEADER_BYTES`) plus ~48 B, held only until it is sent.
//!
//! In both, `CALLBACK_TIMEOUT_MS` counts from when the request is sent, never the time queued.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use crate::config::{CallbackUrl, Config};
use crate::metrics::{CallbackAction, Metrics};
use crate::stream::EndReason;
use crate::token::Token;
use crate::{log, log::Level};

/// The most of a connect answer's body that is read (it may carry `channels`).
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// First pause before a disconnect that never reached the backend is tried again; doubled up to
/// [`MAX_RETRY_BACKOFF`]. A restarting backend is usually back within a few seconds.
const FIRST_RETRY_BACKOFF: Duration = Duration::from_millis(100);
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(2);

/// How a callback ended, as PROTOCOL §2.5 distinguishes.
#[derive(Debug)]
pub enum Outcome {
    /// 2xx, with the answer's body.
    Accepted(Bytes),
    /// Any other status (a 3xx included, never followed).
    Refused(StatusCode),
    Timeout,
    /// No connection could be made, or the connection closed or was reset without a byte of
    /// answer (a keep-alive connection the backend had already closed, or a backend that died):
    /// a disconnect may be retried. The text says why, for the log.
    Unreachable(String),
    /// The request failed after a connection was made (reset, malformed answer).
    Unavailable(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Accepted(_) => f.write_str("accepted"),
            Outcome::Refused(status) => write!(f, "backend answered {}", status.as_u16()),
            Outcome::Timeout => f.write_str("no answer within CALLBACK_TIMEOUT_MS"),
            Outcome::Unreachable(why) => write!(f, "backend unreachable: {why}"),
            Outcome::Unavailable(why) => write!(f, "request failed: {why}"),
        }
    }
}

/// One ended stream whose disconnect callback has not been sent yet.
struct Disconnect {
    token: Token,
    reason: EndReason,
    request: Bytes,
}

/// The disconnect FIFO and how many workers drain it; one lock, so a worker that finds the queue
/// empty and exits can never miss an item pushed at the same moment.
#[derive(Default)]
struct Queue {
    items: VecDeque<Disconnect>,
    workers: usize,
}

pub struct Callbacks {
    url: CallbackUrl,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    retry: Duration,
    concurrency: usize,
    connect_slots: Semaphore,
    /// Connects waiting for a slot (the `callback_queue{action="connect"}` gauge).
    connects_waiting: AtomicUsize,
    disconnects: Mutex<Queue>,
    /// Disconnects queued or in flight; shutdown waits for zero.
    outstanding: AtomicUsize,
    idle: Notify,
    metrics: Arc<Metrics>,
}

impl Callbacks {
    pub fn new(url: CallbackUrl, config: &Config, metrics: Arc<Metrics>) -> Callbacks {
        let timeout = config.callback_timeout;
        let concurrency = config.callback_concurrency;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(2 * concurrency)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Callbacks {
            url,
            client,
            timeout,
            retry: config.callback_retry,
            concurrency,
            connect_slots: Semaphore::new(concurrency),
            connects_waiting: AtomicUsize::new(0),
            disconnects: Mutex::new(Queue::default()),
            outstanding: AtomicUsize::new(0),
            idle: Notify::new(),
            metrics,
        }
    }

    pub fn url(&self) -> &str {
        &self.url.raw
    }

    /// Waits for one of the `CALLBACK_CONCURRENCY` connect slots. The caller races this against
    /// its client leaving: a connect nobody waits for any more is never sent.
    pub async fn connect_slot(&self) -> SemaphorePermit<'_> {
        self.connects_waiting.fetch_add(1, Ordering::Relaxed);
        let waiting = Waiting(&self.connects_waiting);
        let permit = self.connect_slots.acquire().await.expect("never closed");
        drop(waiting);
        permit
    }

    /// Sends the connect callback on a slot from [`Callbacks::connect_slot`].
    pub async fn connect(
        &self,
        _slot: SemaphorePermit<'_>,
        token: Token,
        request: &Bytes,
    ) -> Outcome {
        let body = encode(
            b"{\"action\":\"connect\",\"token\":\"",
            token,
            None,
            request,
        );
        let outcome = self.post(CallbackAction::Connect, token, body).await;
        if !matches!(outcome, Outcome::Accepted(_)) {
            self.metrics.callback_error(CallbackAction::Connect);
        }
        outcome
    }

    /// Queues the disconnect callback of an ended stream; it is sent in queue order by one of at
    /// most `CALLBACK_CONCURRENCY` workers. Never blocks and never drops it.
    pub fn disconnect(self: &Arc<Self>, token: Token, reason: EndReason, request: Bytes) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let mut queue = self.disconnects.lock();
        queue.items.push_back(Disconnect {
            token,
            reason,
            request,
        });
        if queue.workers < self.concurrency {
            queue.workers += 1;
            tokio::spawn(self.clone().drain_disconnects());
        }
    }

    /// Disconnects waiting to be sent (not counting those in flight).
    pub fn disconnects_queued(&self) -> usize {
        self.disconnects.lock().items.len()
    }

    pub fn connects_waiting(&self) -> usize {
        self.connects_waiting.load(Ordering::Relaxed)
    }

    async fn drain_disconnects(self: Arc<Self>) {
        loop {
            let next = {
                let mut queue = self.disconnects.lock();
                let next = queue.items.pop_front();
                if next.is_none() {
                    queue.workers -= 1;
                }
                next
            };
            let Some(disconnect) = next else { return };
            self.send_disconnect(disconnect).await;
            if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.idle.notify_waiters();
            }
        }
    }

    /// One disconnect, retried with back-off while the backend cannot be reached (see
    /// [`Outcome::Unreachable`]), for up to `CALLBACK_RETRY_SECONDS` from the first failure. One
    /// the backend may have answered (a timeout, any status) is never repeated: a duplicate would
    /// break "exactly one disconnect" for a backend that did process it.
    async fn send_disconnect(&self, disconnect: Disconnect) {
        let Disconnect {
            token,
            reason,
            request,
        } = disconnect;
        let body = encode(
            b"{\"action\":\"disconnect\",\"reason\":\"",
            token,
            Some(reason),
            &request,
        );
        let mut first_failure = None;
        let mut backoff = FIRST_RETRY_BACKOFF;
        loop {
            let outcome = self
                .post(CallbackAction::Disconnect, token, body.clone())
                .await;
            let failed_at = *first_failure.get_or_insert_with(Instant::now);
            match outcome {
                Outcome::Accepted(_) => return,
                Outcome::Unreachable(_) if failed_at.elapsed() + backoff <= self.retry => {
                    log!(
                        Level::Debug,
                        "disconnect callback to {} not sent ({outcome}), retrying in {backoff:?} token={token}",
                        self.url.raw
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
                }
                failed => {
                    self.metrics.callback_error(CallbackAction::Disconnect);
                    log!(
                        Level::Warn,
                        "disconnect callback to {} failed: {failed} token={token}",
                        self.url.raw
                    );
                    return;
                }
            }
        }
    }

    /// Waits until no disconnect is queued or in flight (used by shutdown, under its own deadline).
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.outstanding.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    async fn post(&self, action: CallbackAction, token: Token, body: Bytes) -> Outcome {
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.timeout, self.exchange(body))
            .await
            .unwrap_or(Outcome::Timeout);
        self.metrics.callback_latency(action, started.elapsed());
        log!(
            Level::Debug,
            "{} callback: {outcome} in {:?} token={token}",
            action.as_str(),
            started.elapsed()
        );
        outcome
    }

    async fn exchange(&self, body: Bytes) -> Outcome {
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.url.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(err) => {
                let why = error_chain(&err);
                return if err.is_connect() || closed_unanswered(&err) {
                    Outcome::Unreachable(why)
                } else {
                    Outcome::Unavailable(why)
                };
            }
        };
        let status = response.status();
        if !status.is_success() {
            return Outcome::Refused(status);
        }
        match Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
        {
            Ok(body) => Outcome::Accepted(body.to_bytes()),
            // The backend said 2xx; an unreadable or oversized body is treated as an empty one.
            Err(_) => Outcome::Accepted(Bytes::new()),
        }
    }
}

/// Decrements a waiting count when dropped, also when the wait is abandoned.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the connection closed or was reset before any answer: a pooled connection the backend
/// had closed while idle (hyper's "closed before message completed"), or reset by a backend that
/// went away (ECONNRESET, EPIPE). Retrying then is what makes a backend restart lose no
/// disconnect; the price is a possible duplicate when the backend died after acting on the
/// request but before answering (it then lost its state too).
fn closed_unanswered(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut source = err.source();
    while let Some(cause) = source {
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            );
        }
        source = cause.source();
    }
    false
}

/// `err` and its sources, `: `-joined: hyper's top-level message alone ("client error (Connect)")
/// does not say that the connection was refused.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `prefix` + reason + token + request, in the key order of PROTOCOL §2 and §5.
fn encode(prefix: &[u8], token: Token, reason: Option<EndReason>, request: &Bytes) -> Bytes {
    let mut buf = Vec::with_capacity(prefix.len() + 160 + request.len() * 2);
    buf.extend_from_slice(prefix);
    if let Some(reason) = reason {
        buf.extend_from_slice(reason.as_str().as_bytes());
        buf.extend_from_slice(b"\",\"token\":\"");
    }
    let mut text = [0u8; 36];
    token.write_to(&mut text);
    buf.extend_from_slice(&text);
    buf.extend_from_slice(b"\",\"request\":");
    write_request_json(&mut buf, request);
    buf.push(b'}');
    Bytes::from(buf)
}

/// The request a stream keeps for its callbacks, in a compact form no larger than the head the
/// client sent (so `MAX_HEADER_BYTES` bounds it, PROTOCOL §9): the target, then per header name
/// `\n<name>:<value>`, repeated headers already joined with `", "` (`cookie` with `"; "`). `\n` and
/// `:` cannot occur where they would be ambiguous: hyper refuses them in targets and header
/// values, and names are tokens. The JSON form is written per callback by [`write_request_json`].
pub fn capture_request(target: &str, headers: &HeaderMap) -> Bytes {
    // Allocated once at (at most 2 B per field line over) its final size: the stream keeps this
    // buffer for its whole life, and grown by doubling a 15 KiB cookie would leave ~30 KiB.
    let mut out = Vec::with_capacity(capture_size(target, headers));
    out.extend_from_slice(target.as_bytes());
    for name in headers.keys() {
        out.push(b'\n');
        out.extend_from_slice(name.as_str().as_bytes());
        out.push(b':');
        let separator: &[u8] = if name == header::COOKIE { b"; " } else { b", " };
        for (i, part) in headers.get_all(name).iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(separator);
            }
            out.extend_from_slice(part.as_bytes());
        }
    }
    Bytes::from(out)
}

/// An upper bound of [`capture_request`]'s length: each field line adds its name, its value and at
/// most 3 bytes (`\n`, `:`, or a 2-byte separator for a repeated name).
fn capture_size(target: &str, headers: &HeaderMap) -> usize {
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 3)
        .sum();
    target.len() + fields
}

/// The callback's `request` object from [`capture_request`]'s form: lower-case names, values
/// decoded as ISO-8859-1 so no byte is lost.
fn write_request_json(json: &mut Vec<u8>, request: &[u8]) {
    let mut lines = request.split(|&b| b == b'\n');
    let mut text = String::new();
    json.extend_from_slice(b"{\"url\":");
    write_json_latin1(json, &mut text, lines.next().unwrap_or_default());
    json.extend_from_slice(b",\"headers\":{");
    for (i, line) in lines.enumerate() {
        if i > 0 {
            json.push(b',');
        }
        let colon = memchr::memchr(b':', line).unwrap_or(line.len());
        write_json_latin1(json, &mut text, &line[..colon]);
        json.push(b':');
        write_json_latin1(json, &mut text, line.get(colon + 1..).unwrap_or_default());
    }
    json.extend_from_slice(b"}}");
}

/// `bytes` as a JSON string, each byte one ISO-8859-1 character; `text` is reused scratch.
fn write_json_latin1(out: &mut Vec<u8>, text: &mut String, bytes: &[u8]) {
    text.clear();
    text.extend(bytes.iter().map(|&b| char::from(b)));
    serde_json::to_writer(out, text.as_str()).expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn request_object_joins_repeats_and_keeps_every_byte() {
        let mut headers = HeaderMap::new();
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers.append("cookie", HeaderValue::from_static("s=1"));
        headers.append("cookie", HeaderValue::from_static("t=2"));
        headers.append(
            "x-latin",
            HeaderValue::from_bytes(b"caf\xe9 \"q\"").unwrap(),
        );
        let request = capture_request("/a%20b?x=1&y=%2F", &headers);
        let mut json = Vec::new();
        write_request_json(&mut json, &request);
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["url"], "/a%20b?x=1&y=%2F");
        assert_eq!(json["headers"]["x-multi"], "a, b");
        assert_eq!(json["headers"]["cookie"], "s=1; t=2");
        assert_eq!(json["headers"]["x-latin"], "café \"q\"");
        assert_eq!(json["headers"].as_object().unwrap().len(), 3);
        // The copy kept per stream is no larger than the head it came from.
        let head_bytes = "GET /a%20b?x=1&y=%2F HTTP/1.1\r\nx-multi: a\r\nx-multi: b\r\ncookie: s=1\r\ncookie: t=2\r\nx-latin: caf\u{e9} \"q\"\r\n\r\n".len();
        assert!(request.len() < head_bytes);
    }

    #[test]
    fn the_request_copy_is_sized_up_front() {
        let mut headers = HeaderMap::new();
        let cookie = format!("s={}", "c".repeat(15 * 1024));
        headers.append("cookie", HeaderValue::from_str(&cookie).unwrap());
        headers.append("cookie", HeaderValue::from_static("t=2"));
        headers.append("accept", HeaderValue::from_static("text/event-stream"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let target = "/stream?x=1";
        let size = capture_size(target, &headers);
        let copy = capture_request(target, &headers);
        // Never grown (an upper bound), and over only by a repeated name and a byte per line.
        assert!(copy.len() <= size, "{} > {size}", copy.len());
        assert!(size - copy.len() <= 32, "{size} for {}", copy.len());
    }

    #[test]
    fn callback_bodies_have_the_protocol_shape() {
        let token = Token::random();
        let request = capture_request("/", &HeaderMap::new());
        let connect: serde_json::Value = serde_json::from_slice(&encode(
            b"{\"action\":\"connect\",\"token\":\"",
            token,
            None,
            &request,
        ))
        .unwrap();
        assert_eq!(connect["action"], "connect");
        assert_eq!(connect["token"], token.to_string());
        assert!(connect.get("reason").is_none());
        assert_eq!(connect["request"]["url"], "/");
        let disconnect: serde_json::Value = serde_json::from_slice(&encode(
            b"{\"action\":\"disconnect\",\"reason\":\"",
            token,
            Some(EndReason::Error),
            &request,
        ))
        .unwrap();
        assert_eq!(disconnect["reason"], "error");
        assert_eq!(disconnect["token"], token.to_string());
    }
}
