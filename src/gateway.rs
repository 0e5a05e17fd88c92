//! Gateway: the state every connection shares, and the life cycle of a stream around it.
//!
//! Owns admission (`MAX_CONNECTIONS`), the hand-over from a 2xx connect callback to a registered,
//! open stream, and the one place where a stream's end is reported: registry removal, metrics, and
//! the disconnect callback, spawned so that no caller (least of all `/internal/send`) waits on it.
//! It does not parse HTTP or format frames.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::callback::{Callbacks, Outcome};
use crate::channels::{self, Channels};
use crate::config::Config;
use crate::demo::Demo;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::stream::{Delivery, EndReason, Stream};
use crate::{log, log::Level};

pub struct Gateway {
    pub config: Config,
    /// Demo mode's state (`sse-gateway demo`): when `Some`, `/_demo/` is the demo page instead of
    /// a stream path.
    pub demo: Option<Arc<Demo>>,
    pub registry: Registry,
    pub channels: Channels,
    pub metrics: Arc<Metrics>,
    pub callbacks: Option<Arc<Callbacks>>,
    draining: AtomicBool,
    /// Streams admitted: open ones plus those whose connect callback is in flight.
    admitted: AtomicUsize,
}

/// Why a stream could not be opened, before or at the connect callback.
#[derive(Debug)]
pub enum OpenError {
    NotConfigured,
    TooManyConnections,
    Callback(Outcome),
    /// The registry had no addressable slot (not reachable below 4 billion streams).
    RegistryFull,
    /// The backend said 2xx with a `channels` value that is not an array of valid names.
    InvalidChannels,
}

/// A frame could not be queued: the stream's queue would have overflowed, so it was ended.
#[derive(Debug)]
pub struct Overflowed;

impl Gateway {
    pub fn new(config: Config, demo: Option<Arc<Demo>>) -> Arc<Gateway> {
        let metrics = Arc::new(Metrics::default());
        let callbacks = config.callback_url.clone().map(|url| {
            Arc::new(Callbacks::new(
                url,
                config.callback_timeout,
                metrics.clone(),
            ))
        });
        Arc::new(Gateway {
            config,
            demo,
            registry: Registry::new(),
            channels: Channels::new(),
            metrics,
            callbacks,
            draining: AtomicBool::new(false),
            admitted: AtomicUsize::new(0),
        })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Opens a stream for a request whose callback `request` object is given: admission, registry
    /// slot and token, connect callback, and on 2xx the body that owns the stream from then on.
    ///
    /// The callback runs in its own task and the body is created there: if the client leaves while
    /// the callback is in flight (hyper drops the request future), the body is dropped unsent, and
    /// its `Drop` reports `client_closed` — so a 2xx token always gets exactly one disconnect.
    pub async fn open(self: &Arc<Self>, request: Bytes) -> Result<StreamGuard, OpenError> {
        let Some(callbacks) = self.callbacks.clone() else {
            return Err(OpenError::NotConfigured);
        };
        if !self.admit() {
            return Err(OpenError::TooManyConnections);
        }
        let Some(stream) = self.registry.insert(request) else {
            self.release();
            return Err(OpenError::RegistryFull);
        };
        let gateway = self.clone();
        let (answer_tx, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let outcome = callbacks.connect(stream.token, &stream.request).await;
            let result = match outcome {
                Outcome::Accepted(answer) => {
                    let Ok(names) = connect_channels(&answer) else {
                        log!(
                            Level::Warn,
                            "backend returned invalid channels, closing token={}",
                            stream.token
                        );
                        // The backend said 2xx, so it is owed its disconnect.
                        gateway.end(&stream, EndReason::Error);
                        gateway.release();
                        let _ = answer_tx.send(Err(OpenError::InvalidChannels));
                        return;
                    };
                    gateway
                        .channels
                        .join(&stream, names.iter().map(String::as_str));
                    gateway
                        .metrics
                        .connections_total
                        .fetch_add(1, Ordering::Relaxed);
                    log!(Level::Info, "connection opened token={}", stream.token);
                    stream.accept();
                    let guard = StreamGuard {
                        stream,
                        gateway: gateway.clone(),
                    };
                    if gateway.is_draining() {
                        gateway.end(&guard.stream, EndReason::ServerClosed);
                    }
                    Ok(guard)
                }
                refused => {
                    let level = match refused {
                        Outcome::Refused(_) => Level::Info,
                        _ => Level::Warn,
                    };
                    log!(
                        level,
                        "connection refused: {refused:?} token={}",
                        stream.token
                    );
                    if matches!(refused, Outcome::Timeout) {
                        // The backend may have said 2xx after we stopped waiting; it would then
                        // hold a ghost connection. A disconnect (`error`) closes it either way.
                        gateway.end(&stream, EndReason::Error);
                    } else {
                        gateway.registry.remove(stream.token);
                    }
                    gateway.release();
                    Err(OpenError::Callback(refused))
                }
            };
            // A send error means the client is gone: dropping the guard reports `client_closed`.
            let _ = answer_tx.send(result);
        });
        answered
            .await
            .unwrap_or(Err(OpenError::Callback(Outcome::Unavailable)))
    }

    fn admit(&self) -> bool {
        let max = self.config.max_connections;
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }

    /// Reports the end of `stream`, whose transition to ended the caller has just made: removes it
    /// from the registry, counts it, and sends the disconnect callback in the background.
    pub fn report_end(&self, stream: &Stream, reason: EndReason) {
        self.registry.remove(stream.token);
        self.channels.leave_all(stream);
        self.metrics.disconnect(reason);
        log!(
            Level::Info,
            "connection closed ({}) token={}",
            reason.as_str(),
            stream.token
        );
        if let Some(callbacks) = &self.callbacks {
            let in_flight = callbacks.track();
            let (token, request) = (stream.token, stream.request.clone());
            tokio::spawn(async move {
                in_flight
                    .callbacks()
                    .disconnect(token, reason, &request)
                    .await;
            });
        }
    }

    /// Queues `frame` (if any) on `stream` and, with `close`, ends it after the frame; reports the
    /// end it causes (`server_closed`, or `error` on overflow). `Ok(false)`: the stream had already
    /// ended and nothing was queued.
    pub fn deliver(
        &self,
        stream: &Stream,
        frame: Option<&Bytes>,
        close: bool,
    ) -> Result<bool, Overflowed> {
        match stream.deliver(frame, close, self.config.max_queue_bytes) {
            Delivery::Queued { ended } => {
                if frame.is_some() {
                    self.metrics
                        .events_sent_total
                        .fetch_add(1, Ordering::Relaxed);
                }
                if ended {
                    self.report_end(stream, EndReason::ServerClosed);
                }
                Ok(true)
            }
            Delivery::Direct(direct) => {
                let frame = frame.expect("a direct write carries a frame");
                stream.end_direct(crate::writer::write_now(&direct, frame));
                self.metrics
                    .events_sent_total
                    .fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .bytes_sent_total
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                Ok(true)
            }
            Delivery::AlreadyEnded => Ok(false),
            Delivery::Overflowed => {
                log!(
                    Level::Warn,
                    "queue overflow, closing stream token={}",
                    stream.token
                );
                self.report_end(stream, EndReason::Error);
                Err(Overflowed)
            }
        }
    }

    /// Ends `stream` for `reason` and reports it, unless it had already ended.
    pub fn end(&self, stream: &Stream, reason: EndReason) {
        if stream.end(reason) {
            self.report_end(stream, reason);
        }
    }

    /// Starts the drain: readiness turns 503 and every open stream ends with `server_closed`.
    pub fn drain(&self) {
        // SeqCst pairs with `Stream::accept` in `open`: a stream accepted after this store sees
        // `draining` and ends itself; one accepted before it is in the snapshot as accepted.
        self.draining.store(true, Ordering::SeqCst);
        for stream in self.registry.snapshot() {
            if stream.is_accepted() {
                self.end(&stream, EndReason::ServerClosed);
            }
        }
    }
}

/// The channels a 2xx connect answer asks for (PROTOCOL §8): none for an empty or non-JSON body or
/// an object without `channels`; `Err` for a `channels` value that is not an array of valid names.
fn connect_channels(answer: &[u8]) -> Result<Vec<String>, ()> {
    let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(answer) else {
        return Ok(Vec::new());
    };
    match object.get("channels") {
        None => Ok(Vec::new()),
        Some(list) => channels::parse_names(list)
            .map(|names| names.into_iter().map(str::to_owned).collect())
            .ok_or(()),
    }
}

/// Ownership of an accepted stream on the connection side. Whoever holds it (the response body, then
/// the stream's writer) keeps the stream open; dropping it is "the client side is gone": the stream
/// ends with `client_closed` unless it had already ended, and its admission slot is given back.
pub struct StreamGuard {
    pub stream: Arc<Stream>,
    gateway: Arc<Gateway>,
}

impl StreamGuard {
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.gateway.end(&self.stream, EndReason::ClientClosed);
        self.gateway.release();
    }
}

#[cfg(test)]
mod tests {
    use super::connect_channels;

    #[test]
    fn connect_answers_compatible_with_the_original_join_nothing() {
        for body in [&b""[..], b"OK", b"[1,2]", b"{}", b"{\"ok\":true}", b"null"] {
            assert_eq!(connect_channels(body), Ok(vec![]), "{body:?}");
        }
        assert_eq!(
            connect_channels(br#"{"channels":["user.42","prices"]}"#),
            Ok(vec!["user.42".to_string(), "prices".to_string()])
        );
        assert_eq!(connect_channels(br#"{"channels":[]}"#), Ok(vec![]));
    }

    #[test]
    fn bad_channel_values_are_refused() {
        for body in [
            &br#"{"channels":"prices"}"#[..],
            br#"{"channels":null}"#,
            br#"{"channels":[1]}"#,
            br#"{"channels":["a b"]}"#,
            br#"{"channels":[""]}"#,
        ] {
            assert!(connect_channels(body).is_err(), "{body:?}");
        }
    }
}
