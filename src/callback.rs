//! Callbacks: the gateway's HTTP client to the backend (PROTOCOL §2 connect, §5 disconnect).
//!
//! Owns the request bodies' JSON, the pooled keep-alive client, the concurrency bound, the timeout
//! and the classification of outcomes. It decides nothing about streams: the caller turns an outcome
//! into a response or a log line. Redirects are never followed (hyper's client does not follow them;
//! a 3xx is an outcome like any other status).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Notify, Semaphore};

use crate::config::CallbackUrl;
use crate::metrics::{CallbackAction, Metrics};
use crate::stream::EndReason;
use crate::token::Token;
use crate::{log, log::Level};

/// Callbacks of one action in flight at once; with two actions, at most 128 sockets to the backend.
/// A burst of 20k disconnects queues on its own bound instead of opening 20k sockets, and never
/// delays connects (which a browser is waiting on) behind it; 64 overlaps round trips while keeping
/// a small backend's accept queue short.
pub const MAX_IN_FLIGHT: usize = 64;
/// The most of a connect answer's body that is read (it may carry `channels`).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How a connect callback ended, as PROTOCOL §2.5 distinguishes.
#[derive(Debug)]
pub enum Outcome {
    /// 2xx, with the answer's body.
    Accepted(Bytes),
    /// Any other status (a 3xx included, never followed).
    Refused(StatusCode),
    Timeout,
    Unavailable,
}

pub struct Callbacks {
    url: CallbackUrl,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    /// Indexed by [`CallbackAction`].
    permits: [Semaphore; 2],
    in_flight: AtomicUsize,
    idle: Notify,
    metrics: Arc<Metrics>,
}

impl Callbacks {
    pub fn new(url: CallbackUrl, timeout: Duration, metrics: Arc<Metrics>) -> Callbacks {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(2 * MAX_IN_FLIGHT)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Callbacks {
            url,
            client,
            timeout,
            permits: [Semaphore::new(MAX_IN_FLIGHT), Semaphore::new(MAX_IN_FLIGHT)],
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            metrics,
        }
    }

    pub async fn connect(&self, token: Token, request: &Bytes) -> Outcome {
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

    /// Best effort: one attempt, the failure logged and counted, nothing retried.
    pub async fn disconnect(&self, token: Token, reason: EndReason, request: &Bytes) {
        let body = encode(
            b"{\"action\":\"disconnect\",\"reason\":\"",
            token,
            Some(reason),
            request,
        );
        match self.post(CallbackAction::Disconnect, token, body).await {
            Outcome::Accepted(_) => {}
            failed => {
                self.metrics.callback_error(CallbackAction::Disconnect);
                log!(
                    Level::Warn,
                    "disconnect callback failed: {failed:?} token={token}"
                );
            }
        }
    }

    /// Waits until no callback is in flight (used by shutdown, under its own deadline).
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Counts a callback as in flight from before it is spawned, so shutdown's wait cannot miss it.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    async fn post(&self, action: CallbackAction, token: Token, body: Bytes) -> Outcome {
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.timeout, self.exchange(action, body))
            .await
            .unwrap_or(Outcome::Timeout);
        self.metrics.callback_latency(action, started.elapsed());
        log!(
            Level::Debug,
            "{} callback: {outcome:?} in {:?} token={token}",
            action.as_str(),
            started.elapsed()
        );
        outcome
    }

    async fn exchange(&self, action: CallbackAction, body: Bytes) -> Outcome {
        let _permit = self.permits[action as usize]
            .acquire()
            .await
            .expect("never closed");
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.url.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(err) => {
                log!(Level::Debug, "callback transport error: {err}");
                return Outcome::Unavailable;
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

/// Guard of one tracked callback; dropping it marks the callback done.
pub struct InFlight(Arc<Callbacks>);

impl InFlight {
    pub fn callbacks(&self) -> &Callbacks {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// `prefix` + reason + token + request, in the key order of PROTOCOL §2 and §5.
fn encode(prefix: &[u8], token: Token, reason: Option<EndReason>, request: &Bytes) -> Bytes {
    let mut buf = BytesMut::with_capacity(prefix.len() + 80 + request.len());
    buf.put_slice(prefix);
    if let Some(reason) = reason {
        buf.put_slice(reason.as_str().as_bytes());
        buf.put_slice(b"\",\"token\":\"");
    }
    let mut text = [0u8; 36];
    token.write_to(&mut text);
    buf.put_slice(&text);
    buf.put_slice(b"\",\"request\":");
    buf.put_slice(request);
    buf.put_u8(b'}');
    buf.freeze()
}

/// The `request` object of a callback: the raw target and the headers, lower-case names, repeated
/// headers joined with `", "` (`cookie` with `"; "`), values decoded as ISO-8859-1 so no byte is lost.
///
/// An accepted stream keeps this buffer for its whole life (for the disconnect callback), so it is
/// allocated at its final size: exact for ASCII without escapes, which is what browsers send.
/// Grown by doubling instead, a 15 KiB cookie left ~30 KiB allocated per stream (PROTOCOL §9: the
/// copy counts against the head bound, never more).
pub fn encode_request(target: &str, headers: &HeaderMap) -> Bytes {
    let mut json = Vec::with_capacity(request_size(target, headers));
    json.extend_from_slice(b"{\"url\":");
    write_json_str(&mut json, target);
    json.extend_from_slice(b",\"headers\":{");
    let mut value = String::new();
    for (i, name) in headers.keys().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        write_json_str(&mut json, name.as_str());
        json.push(b':');
        let separator = if name == header::COOKIE { "; " } else { ", " };
        value.clear();
        for (j, part) in headers.get_all(name).iter().enumerate() {
            if j > 0 {
                value.push_str(separator);
            }
            value.extend(part.as_bytes().iter().map(|&b| char::from(b)));
        }
        write_json_str(&mut json, &value);
    }
    json.extend_from_slice(b"}}");
    if json.capacity() - json.len() > json.len() / 8 {
        // Escapes or non-ASCII bytes made it grow: keep an exact copy rather than the slack.
        return Bytes::copy_from_slice(&json);
    }
    Bytes::from(json)
}

/// [`encode_request`]'s length when nothing needs escaping: `{"url":"…","headers":{}}` is 24
/// bytes; each field line adds at most `"name":"value",` (6 more than its name and value) or, for a
/// repeated name, its 2-byte separator.
fn request_size(target: &str, headers: &HeaderMap) -> usize {
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 6)
        .sum();
    24 + target.len() + fields
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing to a Vec cannot fail");
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
        let json: serde_json::Value =
            serde_json::from_slice(&encode_request("/a%20b?x=1&y=%2F", &headers)).unwrap();
        assert_eq!(json["url"], "/a%20b?x=1&y=%2F");
        assert_eq!(json["headers"]["x-multi"], "a, b");
        assert_eq!(json["headers"]["cookie"], "s=1; t=2");
        assert_eq!(json["headers"]["x-latin"], "café \"q\"");
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
        let size = request_size(target, &headers);
        let json = encode_request(target, &headers);
        // Never grown (an upper bound) and hardly more than needed.
        assert!(json.len() <= size, "{} > {size}", json.len());
        assert!(
            size - json.len() <= 6 * headers.len(),
            "{size} for {}",
            json.len()
        );
    }

    #[test]
    fn callback_bodies_have_the_protocol_shape() {
        let token = Token::random();
        let request = Bytes::from_static(b"{\"url\":\"/\",\"headers\":{}}");
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
