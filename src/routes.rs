//! Routes: the hyper `Service` that maps `(listener, method, path)` to an answer (PROTOCOL §1, §2, §4).
//!
//! Owns HTTP-level decisions: which listener serves what, method checks, the bearer secret, body
//! limits, request validation in the protocol's order, and every status and JSON body. It hands
//! stream life cycle to [`crate::gateway`] and frame bytes to [`crate::frame`]; it holds no state of
//! its own beyond an `Arc` of the gateway.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::body::{Handoff, ResponseBody, StreamBody};
use crate::callback::{encode_request, Outcome};
use crate::channels;
use crate::frame::{self, Event};
use crate::gateway::{Gateway, OpenError, Overflowed};
use crate::log::Level;
use crate::stream::Stream;
use crate::token::Token;

/// Which listener a connection came in on, and so what it may reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The public port when there is no internal listener: everything.
    Combined,
    /// The public port beside an internal listener: streams and probes only.
    Public,
    /// `INTERNAL_HOST:INTERNAL_PORT`: `/internal/*`, `/metrics` and probes; never streams.
    Internal,
}

/// One per connection: the handoff is that connection's.
#[derive(Clone)]
pub struct Routes {
    gateway: Arc<Gateway>,
    listener: Listener,
    handoff: Arc<Handoff>,
}

type Answer = Response<ResponseBody>;

impl hyper::service::Service<Request<Incoming>> for Routes {
    type Response = Answer;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let routes = self.clone();
        Box::pin(async move { Ok(routes.route(request).await) })
    }
}

impl Routes {
    pub fn new(gateway: Arc<Gateway>, listener: Listener, handoff: Arc<Handoff>) -> Routes {
        Routes {
            gateway,
            listener,
            handoff,
        }
    }

    fn serves_internal(&self) -> bool {
        self.listener != Listener::Public
    }

    async fn route(self, request: Request<Incoming>) -> Answer {
        let path = request.uri().path();
        match path {
            "/healthz" => get_only(&request, || json(StatusCode::OK, r#"{"status":"ok"}"#)),
            "/readyz" => get_only(&request, || self.readyz()),
            "/metrics" if self.serves_internal() => get_only(&request, || self.metrics()),
            "/metrics" => not_found(),
            _ if path == "/internal" || path.starts_with("/internal/") => {
                if self.serves_internal() {
                    self.internal(request).await
                } else {
                    not_found()
                }
            }
            _ if self.listener == Listener::Internal => not_found(),
            // Only in demo mode; otherwise `/_demo/` is a stream path like any other.
            _ if crate::demo::reserves(&self.gateway.config, path) => {
                crate::demo::serve(&self.gateway.config, request.method(), request.uri())
            }
            _ if request.method() == Method::GET => self.open_stream(request).await,
            _ => method_not_allowed("GET"),
        }
    }

    fn readyz(&self) -> Answer {
        let configured = self.gateway.callbacks.is_some();
        if self.gateway.is_draining() {
            let body = format!(r#"{{"status":"draining","configured":{configured}}}"#);
            json_owned(StatusCode::SERVICE_UNAVAILABLE, body)
        } else if configured {
            json(StatusCode::OK, r#"{"status":"ready","configured":true}"#)
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"status":"not_ready","configured":false}"#,
            )
        }
    }

    fn metrics(&self) -> Answer {
        let text = self
            .gateway
            .metrics
            .render(self.gateway.registry.len(), self.gateway.channels.len());
        let mut answer = Response::new(ResponseBody::Full(Some(Bytes::from(text))));
        answer.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        answer
    }

    async fn open_stream(self, request: Request<Incoming>) -> Answer {
        if self.gateway.is_draining() {
            return error(StatusCode::SERVICE_UNAVAILABLE, "Server shutting down");
        }
        let uri = request.uri();
        // Origin-form targets keep their exact bytes; an absolute-form target is rebuilt whole.
        let target = match (uri.scheme(), uri.path_and_query()) {
            (None, Some(pq)) => pq.as_str().to_owned(),
            _ => uri.to_string(),
        };
        let request_json = encode_request(&target, request.headers());
        // hyper frames an unknown-length body as chunked for HTTP/1.1, close-delimited for 1.0.
        let chunked = request.version() >= Version::HTTP_11;
        // Drop the request now: its header values pin hyper's 8 KiB read buffer, which would
        // otherwise stay allocated for the life of the stream.
        drop(request);
        match self.gateway.open(request_json).await {
            Ok(guard) => {
                let body = StreamBody::new(guard, chunked, self.handoff.clone());
                let mut answer = Response::new(ResponseBody::Stream(body));
                let headers = answer.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
                headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
                answer
            }
            Err(OpenError::NotConfigured) => {
                error(StatusCode::SERVICE_UNAVAILABLE, "Service not configured")
            }
            Err(OpenError::TooManyConnections | OpenError::RegistryFull) => {
                error(StatusCode::SERVICE_UNAVAILABLE, "Too many connections")
            }
            Err(OpenError::Callback(Outcome::Refused(status))) => json_owned(
                status,
                format!(r#"{{"error":"Backend returned {}"}}"#, status.as_u16()),
            ),
            Err(OpenError::InvalidChannels) => {
                error(StatusCode::BAD_GATEWAY, "Backend returned invalid channels")
            }
            Err(OpenError::Callback(Outcome::Timeout)) => {
                error(StatusCode::GATEWAY_TIMEOUT, "Gateway timeout")
            }
            Err(OpenError::Callback(Outcome::Unavailable | Outcome::Accepted(_))) => {
                error(StatusCode::SERVICE_UNAVAILABLE, "Backend unavailable")
            }
        }
    }

    async fn internal(self, request: Request<Incoming>) -> Answer {
        if let Some(secret) = &self.gateway.config.internal_secret {
            if !bearer_matches(request.headers().get(header::AUTHORIZATION), secret) {
                return error(StatusCode::UNAUTHORIZED, "Unauthorized");
            }
        }
        let handler = match request.uri().path() {
            "/internal/send" => Handler::Send,
            "/internal/publish" => Handler::Publish,
            "/internal/subscribe" => Handler::Membership(Membership::Join),
            "/internal/unsubscribe" => Handler::Membership(Membership::Leave),
            _ => return not_found(),
        };
        if request.method() != Method::POST {
            return method_not_allowed("POST");
        }
        let config = &self.gateway.config;
        let object = match read_object(request, config.max_send_bytes, config.body_timeout).await {
            Ok(object) => object,
            Err(answer) => return answer,
        };
        match handler {
            Handler::Send => self.send(&object),
            Handler::Publish => self.publish(&object).await,
            Handler::Membership(change) => self.membership(&object, change),
        }
    }

    /// `POST /internal/send` (PROTOCOL §4), after the body was read as a JSON object.
    fn send(&self, object: &Map<String, Value>) -> Answer {
        let token = match parse_token(object) {
            Ok(token) => token,
            Err(message) => return invalid(message),
        };
        let (event, close) = match parse_event(object).and_then(|e| Ok((e, parse_close(object)?))) {
            Ok(parsed) => parsed,
            Err(message) => return invalid(message),
        };
        let Some(stream) = self.open_stream_by_token(token) else {
            return token_not_found();
        };
        let frame = event.as_ref().map(frame::encode);
        match self.gateway.deliver(&stream, frame.as_ref(), close) {
            Ok(true) => {
                log!(
                    Level::Debug,
                    "send accepted (close={close}) token={}",
                    stream.token
                );
                json(StatusCode::OK, r#"{"status":"ok"}"#)
            }
            Ok(false) => token_not_found(),
            Err(Overflowed) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Write failed: connection closed",
            ),
        }
    }

    /// `POST /internal/publish` (PROTOCOL §8): one frame, encoded once, to every member of any
    /// listed channel, each stream once.
    async fn publish(&self, object: &Map<String, Value>) -> Answer {
        let names = match (object.get("channel"), object.get("channels")) {
            (Some(Value::String(name)), None) if channels::is_valid_name(name) => {
                vec![name.as_str()]
            }
            (None, Some(list)) => match channels::parse_names(list) {
                Some(names) if !names.is_empty() => names,
                _ => return invalid(PUBLISH_TARGET),
            },
            _ => return invalid(PUBLISH_TARGET),
        };
        let (event, close) = match parse_event(object).and_then(|e| Ok((e, parse_close(object)?))) {
            Ok(parsed) => parsed,
            Err(message) => return invalid(message),
        };
        if event.is_none() && !close {
            return invalid("event or close: true is required");
        }
        let gateway = &self.gateway;
        let frame = event.as_ref().map(frame::encode);
        let members = gateway.channels.members_of_any(names.iter().copied());
        let mut delivered = 0;
        for (i, chunk) in members.chunks(FANOUT_CHUNK).enumerate() {
            if i > 0 {
                // Idle members are written to right here (one `writev` each, no task switch), so
                // a big fan-out is one long-running task: yielding between chunks lets a request
                // that arrives meanwhile run after ~256 writes (~2 ms), not after all 18k.
                tokio::task::yield_now().await;
            }
            delivered += chunk
                .iter()
                .filter(|stream| matches!(gateway.deliver(stream, frame.as_ref(), close), Ok(true)))
                .count();
        }
        gateway
            .metrics
            .publishes_total
            .fetch_add(1, Ordering::Relaxed);
        gateway
            .metrics
            .publish_deliveries_total
            .fetch_add(delivered as u64, Ordering::Relaxed);
        log!(
            Level::Debug,
            "publish to {names:?} delivered to {delivered} of {} streams",
            members.len()
        );
        json_owned(
            StatusCode::OK,
            format!(r#"{{"status":"ok","delivered":{delivered}}}"#),
        )
    }

    /// `POST /internal/subscribe` and `/internal/unsubscribe` (PROTOCOL §8). Every name is checked
    /// before the token is looked up, so a request with one bad name changes nothing.
    fn membership(&self, object: &Map<String, Value>, change: Membership) -> Answer {
        let token = match parse_token(object) {
            Ok(token) => token,
            Err(message) => return invalid(message),
        };
        let Some(names) = object.get("channels").and_then(channels::parse_names) else {
            return invalid(CHANNEL_LIST);
        };
        let Some(stream) = self.open_stream_by_token(token) else {
            return token_not_found();
        };
        let channels = &self.gateway.channels;
        match change {
            Membership::Join => channels.join(&stream, names),
            Membership::Leave => channels.leave(&stream, names),
        }
        json(StatusCode::OK, r#"{"status":"ok"}"#)
    }

    /// The open stream a token names: registered and accepted by its connect callback.
    fn open_stream_by_token(&self, token: &str) -> Option<Arc<Stream>> {
        Token::parse(token)
            .and_then(|token| self.gateway.registry.get(token))
            .filter(|stream| stream.is_accepted())
    }
}

#[derive(Clone, Copy)]
enum Membership {
    Join,
    Leave,
}

/// The `/internal/*` routes, chosen before the body is read.
enum Handler {
    Send,
    Publish,
    Membership(Membership),
}

/// Streams a publish delivers to between two yields to the scheduler.
const FANOUT_CHUNK: usize = 256;

const PUBLISH_TARGET: &str = "exactly one of channel (a channel name) or channels (a non-empty array of channel names) is required; a channel name is 1-256 visible ASCII characters";
const CHANNEL_LIST: &str =
    "channels must be an array of channel names (1-256 visible ASCII characters)";

fn parse_token(object: &Map<String, Value>) -> Result<&str, &'static str> {
    match object.get("token") {
        Some(Value::String(token)) if !token.is_empty() => Ok(token),
        _ => Err("token is required and must be a string"),
    }
}

fn token_not_found() -> Answer {
    error(StatusCode::NOT_FOUND, "Token not found")
}

/// Validates `event` as PROTOCOL §4 orders its checks; `None` when there is no `event` key.
fn parse_event(object: &Map<String, Value>) -> Result<Option<Event<'_>>, &'static str> {
    let event = match object.get("event") {
        None => return Ok(None),
        Some(Value::Object(event)) => event,
        Some(_) => return Err("event must be an object"),
    };
    let Some(Value::String(data)) = event.get("data") else {
        return Err("event.data is required and must be a string");
    };
    let name = match event.get("name") {
        None => None,
        Some(Value::String(name)) => Some(name.as_str()),
        Some(_) => return Err("event.name must be a string"),
    };
    if name.is_some_and(|n| n.contains(['\r', '\n'])) {
        return Err("event.name must not contain CR or LF");
    }
    let id = match event.get("id") {
        None => None,
        Some(Value::String(id)) => Some(id.as_str()),
        Some(_) => return Err("event.id must be a string"),
    };
    if id.is_some_and(|i| i.contains(['\r', '\n', '\0'])) {
        return Err("event.id must not contain CR, LF or NUL");
    }
    let retry = match event.get("retry") {
        None => None,
        Some(retry) => Some(
            retry
                .as_u64()
                .ok_or("event.retry must be a non-negative integer")?,
        ),
    };
    Ok(Some(Event {
        name,
        id,
        retry,
        data,
    }))
}

fn parse_close(object: &Map<String, Value>) -> Result<bool, &'static str> {
    match object.get("close") {
        None => Ok(false),
        Some(Value::Bool(close)) => Ok(*close),
        Some(_) => Err("close must be a boolean"),
    }
}

/// Reads a body of at most `max` bytes, complete within `within` of the head, and parses it as a
/// JSON object; the error is the answer. A refusal before the body's end says `Connection: close`:
/// the unread rest is discarded by the connection's lingering close, never parsed as a request.
async fn read_object(
    request: Request<Incoming>,
    max: usize,
    within: Duration,
) -> Result<Map<String, Value>, Answer> {
    let closing = |status, message| {
        let mut answer = error(status, message);
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        answer
    };
    let too_large = || closing(StatusCode::PAYLOAD_TOO_LARGE, "Payload too large");
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(within, Limited::new(request.into_body(), max).collect());
    let body = match read.await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(err)) => {
            log!(Level::Debug, "request body read failed: {err}");
            return Err(error(
                StatusCode::BAD_REQUEST,
                "Invalid request: body could not be read",
            ));
        }
        Err(_) => return Err(closing(StatusCode::REQUEST_TIMEOUT, "Request timeout")),
    };
    match serde_json::from_slice(&body) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(invalid("body must be a JSON object")),
    }
}

/// Compares the bearer token in constant time for a given length; only the length can leak.
fn bearer_matches(authorization: Option<&HeaderValue>, secret: &str) -> bool {
    let Some(given) = authorization.and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")) else {
        return false;
    };
    let secret = secret.as_bytes();
    if given.len() != secret.len() {
        return false;
    }
    let diff = given
        .iter()
        .zip(secret)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

fn get_only(request: &Request<Incoming>, answer: impl FnOnce() -> Answer) -> Answer {
    if request.method() == Method::GET {
        answer()
    } else {
        method_not_allowed("GET")
    }
}

fn json(status: StatusCode, body: &'static str) -> Answer {
    json_bytes(status, Bytes::from_static(body.as_bytes()))
}

fn json_owned(status: StatusCode, body: String) -> Answer {
    json_bytes(status, Bytes::from(body))
}

fn json_bytes(status: StatusCode, body: Bytes) -> Answer {
    let mut answer = Response::new(ResponseBody::Full(Some(body)));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

fn error(status: StatusCode, message: &str) -> Answer {
    json_owned(status, serde_json::json!({ "error": message }).to_string())
}

fn invalid(message: &str) -> Answer {
    error(
        StatusCode::BAD_REQUEST,
        &format!("Invalid request: {message}"),
    )
}

fn not_found() -> Answer {
    error(StatusCode::NOT_FOUND, "Not found")
}

fn method_not_allowed(allow: &'static str) -> Answer {
    let mut answer = error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
    answer
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_needs_the_exact_secret() {
        let check = |v: &'static str| bearer_matches(Some(&HeaderValue::from_static(v)), "s3cret");
        assert!(check("Bearer s3cret"));
        assert!(!check("Bearer s3cre"));
        assert!(!check("Bearer s3cret!"));
        assert!(!check("bearer s3cret"));
        assert!(!check("s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
    }
}
