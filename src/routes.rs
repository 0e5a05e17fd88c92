//! Routes: the hyper `Service` that maps `(listener, method, path)` to an answer (PROTOCOL §1, §2, §4,
//! §8, §12).
//!
//! Owns HTTP-level decisions: which listener serves what, method checks, the bearer secret, body
//! limits, and every status and JSON body. It parses (bodies through [`crate::command`]) and
//! answers, nothing more: every operation is a call on [`Gateway`]'s API, and it holds no state of
//! its own beyond an `Arc` of the gateway. One function, `apply`, turns an operation's body and
//! outcome into its status and body, for its own route and for a batch item alike.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body::{Handoff, ResponseBody, StreamBody};
use crate::callback::{capture_request, Outcome};
use crate::channels::TooManyChannels;
use crate::cluster::{ClusterError, Published};
use crate::command::{self, Operation};
use crate::connection::Refusal;
use crate::gateway::{Batch, Gateway, MembershipError, OpenError, SendError};
use crate::history;
use crate::log::Level;

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
            _ if crate::demo::reserves(self.gateway.demo.as_deref(), path) => crate::demo::serve(
                self.gateway.demo.as_deref(),
                request.method(),
                request.uri(),
            ),
            _ if request.method() == Method::GET => self.open_stream(request).await,
            _ => method_not_allowed("GET"),
        }
    }

    /// Ready: configured, not draining, and in a cluster joined to Redis (PROTOCOL §7, §10).
    fn readyz(&self) -> Answer {
        let configured = self.gateway.callbacks.is_some();
        let redis = self.gateway.cluster.as_ref().map(|c| c.is_up());
        let status = if self.gateway.is_draining() {
            "draining"
        } else if configured && redis != Some(false) {
            "ready"
        } else {
            "not_ready"
        };
        let code = match status {
            "ready" => StatusCode::OK,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = match redis {
            None => format!(r#"{{"status":"{status}","configured":{configured}}}"#),
            Some(redis) => {
                format!(r#"{{"status":"{status}","configured":{configured},"redis":{redis}}}"#)
            }
        };
        json_owned(code, body)
    }

    fn metrics(&self) -> Answer {
        let gateway = &self.gateway;
        let queue = gateway
            .callbacks
            .as_ref()
            .map_or([0, 0], |c| [c.connects_waiting(), c.disconnects_queued()]);
        let mut text = gateway.metrics.render(
            gateway.registry.len(),
            gateway.channels.len(),
            queue,
            gateway.history.as_ref().map_or(0, |h| h.bytes()),
        );
        if let Some(cluster) = &gateway.cluster {
            cluster.gauges().render(&mut text);
        }
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
        let target = request_target(uri);
        let request_copy = capture_request(&target, request.headers());
        let last_event_id = self
            .gateway
            .history_on()
            .then(|| {
                let header = request.headers().get("last-event-id");
                history::requested(header.map(HeaderValue::as_bytes), &target)
            })
            .flatten();
        // hyper frames an unknown-length body as chunked for HTTP/1.1, close-delimited for 1.0.
        let chunked = request.version() >= Version::HTTP_11;
        // Drop the request now: its header values pin hyper's 8 KiB read buffer, which would
        // otherwise stay allocated for the life of the stream.
        drop(request);
        match self.gateway.open(request_copy, last_event_id).await {
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
            Err(OpenError::Callback(
                Outcome::Unreachable(_) | Outcome::Unavailable(_) | Outcome::Accepted(_),
            )) => error(StatusCode::SERVICE_UNAVAILABLE, "Backend unavailable"),
        }
    }

    async fn internal(self, request: Request<Incoming>) -> Answer {
        if let Some(secret) = &self.gateway.config.internal_secret {
            if !bearer_matches(request.headers().get(header::AUTHORIZATION), secret) {
                return error(StatusCode::UNAUTHORIZED, "Unauthorized");
            }
        }
        let route = match request.uri().path().strip_prefix("/internal/") {
            Some("batch") => None,
            Some(name) => match Operation::from_name(name) {
                Some(operation) => Some(operation),
                None => return not_found(),
            },
            None => return not_found(),
        };
        if request.method() != Method::POST {
            return method_not_allowed("POST");
        }
        let config = &self.gateway.config;
        let object = match read_object(request, config.max_send_bytes, config.body_timeout).await {
            Ok(object) => object,
            Err(answer) => return answer,
        };
        match route {
            Some(operation) => {
                let gateway = &*self.gateway;
                apply(Target::Gateway(gateway), operation, &object)
                    .await
                    .into_answer()
            }
            None => self.batch(&object).await,
        }
    }

    /// `POST /internal/batch` (PROTOCOL §12): each item answered as its own route would answer
    /// it, in order, inside one 200.
    async fn batch(&self, object: &command::Object) -> Answer {
        let items = match command::batch(object) {
            Ok(items) => items,
            Err(message) => return invalid(message),
        };
        let limit = self.gateway.config.max_batch_items;
        if items.len() > limit {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "Invalid request: a batch may hold at most {limit} requests (MAX_BATCH_ITEMS); nothing was applied"
                ),
            );
        }
        // ~40 B per result (`{"status":200,"body":{"status":"ok"}},`).
        let mut results = Vec::with_capacity(16 + 40 * items.len());
        results.extend_from_slice(br#"{"results":["#);
        let mut batch = self.gateway.batch();
        for (i, item) in items.iter().enumerate() {
            let reply = match command::batch_item(item) {
                Ok((operation, object)) => {
                    apply(Target::Batch(&mut batch), operation, object).await
                }
                Err(message) => Reply::invalid(message),
            };
            if i > 0 {
                results.push(b',');
            }
            results.extend_from_slice(br#"{"status":"#);
            results.extend_from_slice(reply.status.as_str().as_bytes());
            results.extend_from_slice(br#","body":"#);
            results.extend_from_slice(&reply.body);
            results.push(b'}');
            batch.pace().await;
        }
        // Writes what is still queued before the backend hears 200.
        drop(batch);
        results.extend_from_slice(b"]}");
        self.gateway
            .metrics
            .batch_items_total
            .fetch_add(items.len() as u64, std::sync::atomic::Ordering::Relaxed);
        json_bytes(StatusCode::OK, Bytes::from(results))
    }
}

/// Where an operation is applied: by its own route straight on the gateway, or as a batch item.
enum Target<'a, 'g> {
    Gateway(&'a Gateway),
    Batch(&'a mut Batch<'g>),
}

impl Target<'_, '_> {
    fn history_on(&self) -> bool {
        match self {
            Target::Gateway(gateway) => gateway.history_on(),
            Target::Batch(batch) => batch.history_on(),
        }
    }
}

/// PROTOCOL §11: with history on, a published event's id is its position.
const PUBLISH_ID_WITH_HISTORY: &str =
    "event.id is not allowed in a publish while history is on (HISTORY_SIZE > 0): the gateway assigns every published event's id";

/// PROTOCOL §11: an empty `id:` makes the browser forget its position, so its next reconnect
/// could not resume and would not even be told (no `Last-Event-ID`, no gap).
const SEND_EMPTY_ID_WITH_HISTORY: &str =
    "event.id must not be empty while history is on (HISTORY_SIZE > 0): it would make the page forget its position and lose channel events on its next reconnect";

/// One operation's answer from its body: the single routes and every batch item go through here,
/// so an item's result is exactly what its own request would have got.
async fn apply(target: Target<'_, '_>, operation: Operation, object: &command::Object) -> Reply {
    match operation {
        Operation::Send => match command::send(object) {
            Ok(send) if send.event.is_some_and(|e| e.id == Some("")) && target.history_on() => {
                Reply::invalid(SEND_EMPTY_ID_WITH_HISTORY)
            }
            Ok(send) => send_reply(match target {
                Target::Gateway(gateway) => gateway.send(&send).await,
                Target::Batch(batch) => batch.send(&send).await,
            }),
            Err(message) => Reply::invalid(message),
        },
        Operation::Publish => match command::publish(object) {
            Ok(publish) if publish.event.is_some_and(|e| e.id.is_some()) && target.history_on() => {
                Reply::invalid(PUBLISH_ID_WITH_HISTORY)
            }
            Ok(publish) => publish_reply(match target {
                Target::Gateway(gateway) => gateway.publish(&publish).await,
                Target::Batch(batch) => batch.publish(&publish).await,
            }),
            Err(message) => Reply::invalid(message),
        },
        Operation::Subscribe | Operation::Unsubscribe => match command::membership(object) {
            Ok(change) => membership_reply(match (target, operation) {
                (Target::Gateway(gateway), Operation::Subscribe) => {
                    gateway.subscribe(&change).await
                }
                (Target::Gateway(gateway), _) => gateway.unsubscribe(&change).await,
                (Target::Batch(batch), Operation::Subscribe) => batch.subscribe(&change).await,
                (Target::Batch(batch), _) => batch.unsubscribe(&change).await,
            }),
            Err(message) => Reply::invalid(message),
        },
    }
}

/// `/internal/send` (PROTOCOL §4).
fn send_reply(result: Result<(), SendError>) -> Reply {
    match result {
        Ok(()) => Reply::ok(),
        Err(SendError::NotFound) => Reply::token_not_found(),
        Err(SendError::Overflowed) => Reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Write failed: connection closed",
        ),
        Err(SendError::Cluster(err)) => Reply::cluster(err),
    }
}

/// `/internal/publish` (PROTOCOL §8, §10: `complete:false` only when some node did not answer).
fn publish_reply(result: Result<Published, ClusterError>) -> Reply {
    match result {
        Ok(Published {
            delivered,
            complete,
        }) => Reply {
            status: StatusCode::OK,
            body: Bytes::from(if complete {
                format!(r#"{{"status":"ok","delivered":{delivered}}}"#)
            } else {
                format!(r#"{{"status":"ok","delivered":{delivered},"complete":false}}"#)
            }),
        },
        Err(err) => Reply::cluster(err),
    }
}

/// `/internal/subscribe` and `/internal/unsubscribe` (PROTOCOL §8, §9).
fn membership_reply(result: Result<(), MembershipError>) -> Reply {
    match result {
        Ok(()) => Reply::ok(),
        Err(MembershipError::NotFound) => Reply::token_not_found(),
        Err(MembershipError::TooManyChannels(TooManyChannels { limit })) => Reply::error(
            StatusCode::BAD_REQUEST,
            &format!(
                "Invalid request: a stream may be in at most {limit} channels (MAX_CHANNELS_PER_STREAM); nothing was changed"
            ),
        ),
        Err(MembershipError::Cluster(err)) => Reply::cluster(err),
    }
}

/// What an operation answers: a status and a JSON body, sent as a response by a single route
/// and written into the results by a batch.
struct Reply {
    status: StatusCode,
    body: Bytes,
}

impl Reply {
    fn ok() -> Reply {
        Reply {
            status: StatusCode::OK,
            body: Bytes::from_static(br#"{"status":"ok"}"#),
        }
    }

    fn token_not_found() -> Reply {
        Reply {
            status: StatusCode::NOT_FOUND,
            body: Bytes::from_static(br#"{"error":"Token not found"}"#),
        }
    }

    fn error(status: StatusCode, message: &str) -> Reply {
        let body = serde_json::json!({ "error": message }).to_string();
        Reply {
            status,
            body: Bytes::from(body),
        }
    }

    /// PROTOCOL §10: Redis unreachable (503, nothing delivered) or a holder that did not answer.
    fn cluster(err: ClusterError) -> Reply {
        match err {
            ClusterError::Unavailable => {
                Reply::error(StatusCode::SERVICE_UNAVAILABLE, "Cluster unavailable")
            }
            ClusterError::Timeout => Reply::error(StatusCode::GATEWAY_TIMEOUT, "Cluster timeout"),
        }
    }

    fn invalid(message: &str) -> Reply {
        Reply::error(
            StatusCode::BAD_REQUEST,
            &format!("Invalid request: {message}"),
        )
    }

    fn into_answer(self) -> Answer {
        json_bytes(self.status, self.body)
    }
}

/// The request target as the client sent it: an origin-form target keeps its exact bytes; an
/// absolute- or authority-form one (rare) is rebuilt whole.
pub(crate) fn request_target(uri: &Uri) -> std::borrow::Cow<'_, str> {
    match (uri.scheme(), uri.path_and_query()) {
        (None, Some(pq)) => pq.as_str().into(),
        _ => uri.to_string().into(),
    }
}

/// Reads a body of at most `max` bytes, complete within `within` of the head, and parses it as a
/// JSON object; the error is the answer. A refusal before the body's end says `Connection: close`:
/// the unread rest is discarded by the connection's lingering close, never parsed as a request.
async fn read_object(
    request: Request<Incoming>,
    max: usize,
    within: Duration,
) -> Result<command::Object, Answer> {
    let too_large = || Refusal::PayloadTooLarge.answer();
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
        Err(_) => return Err(Refusal::Timeout.answer()),
    };
    command::parse_object(&body).map_err(invalid)
}

/// Compares the bearer token in constant time for a given length; only the length can leak.
/// The scheme is case-insensitive (RFC 9110 §11.1: `bearer x` and `BEARER x` are `Bearer x`),
/// followed by one space; the secret is compared exactly.
fn bearer_matches(authorization: Option<&HeaderValue>, secret: &str) -> bool {
    let Some(given) = authorization.and_then(|v| {
        let (scheme, rest) = v.as_bytes().split_at_checked(7)?;
        scheme.eq_ignore_ascii_case(b"Bearer ").then_some(rest)
    }) else {
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
    Reply::error(status, message).into_answer()
}

fn invalid(message: &str) -> Answer {
    Reply::invalid(message).into_answer()
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
    fn bearer_needs_the_exact_secret_and_any_case_of_the_scheme() {
        let check = |v: &'static str| bearer_matches(Some(&HeaderValue::from_static(v)), "s3cret");
        assert!(check("Bearer s3cret"));
        assert!(check("bearer s3cret"));
        assert!(check("BEARER s3cret"));
        assert!(check("bEaReR s3cret"));
        assert!(!check("Bearer s3cre"));
        assert!(!check("Bearer s3cret!"));
        assert!(!check("Bearer S3CRET"));
        assert!(!check("Bearer"));
        assert!(!check("Bearer "));
        assert!(!check("Bearers3cret"));
        assert!(!check("Basic s3cret"));
        assert!(!check("s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
    }
}
