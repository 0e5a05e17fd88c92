//! Gateway: the state every connection shares, and the life cycle of a stream around it.
//!
//! Owns admission (`MAX_CONNECTIONS`), the hand-over from a 2xx connect callback to a registered,
//! open stream, the operations the backend asks for (send, publish, subscribe, unsubscribe: the one
//! API that routes call, whatever the request looked like), and the one place where a stream's end
//! is reported: registry removal, metrics, and the disconnect callback, queued so that no caller
//! (least of all `/internal/send`) waits on it. In a cluster (`REDIS_URL`), an operation whose
//! token another node issued, and every publish, goes through [`Cluster`]; what other nodes send
//! here comes back in through [`Gateway::apply_forwarded`] and [`Gateway::deliver_published`], so
//! routes never know where a token lives. It does not parse HTTP and does no socket I/O:
//! frames go to [`Stream::deliver`], which decides between its queue and a direct write, or, in a
//! [`Batch`], to [`Stream::defer`] and then one [`Stream::flush`] per stream.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::callback::{Callbacks, Outcome};
use crate::channels::{self, Channels, TooManyChannels};
use crate::cluster::{message, Ask, Cluster, ClusterError, Code, Published};
use crate::command;
use crate::config::Config;
use crate::demo::Demo;
use crate::frame;
use crate::history::{self, memory, Resume};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::stream::{Delivery, EndReason, Full, Stream};
use crate::token::Token;
use crate::{log, log::Level};

/// Streams a publish delivers to between two yields to the scheduler: idle members are written to
/// from the publishing task (one `writev` each), so ~256 writes (~2 ms) is the longest a request
/// that arrives meanwhile waits behind a fan-out to 18k streams.
const FANOUT_CHUNK: usize = 256;
/// ... and frame bytes: a 1 MiB frame costs the kernel ~0.2 ms per stream to copy, so a chunk of
/// big frames is cut at 4 MiB (~1 ms) instead (PROTOCOL §9: no request holds a worker for long).
const FANOUT_CHUNK_BYTES: usize = 4 << 20;

pub struct Gateway {
    pub config: Config,
    /// Demo mode's state (`sse-gateway demo`): when `Some`, `/_demo/` is the demo page instead of
    /// a stream path.
    pub demo: Option<Arc<Demo>>,
    pub registry: Registry,
    pub channels: Channels,
    pub metrics: Arc<Metrics>,
    pub callbacks: Option<Arc<Callbacks>>,
    /// The other nodes of the deployment, with `REDIS_URL`.
    pub cluster: Option<Arc<Cluster>>,
    /// The single node's channel history (PROTOCOL §11), with `HISTORY_SIZE`; in a cluster Redis
    /// keeps it (see [`Cluster::history`]).
    pub history: Option<memory::Store>,
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

/// Why a send by token did nothing.
#[derive(Debug)]
pub enum SendError {
    /// No open stream has this token.
    NotFound,
    Overflowed,
    /// The token is another node's, and the cluster could not say what it did.
    Cluster(ClusterError),
}

/// Why a subscribe or unsubscribe did nothing.
#[derive(Debug)]
pub enum MembershipError {
    NotFound,
    TooManyChannels(TooManyChannels),
    Cluster(ClusterError),
}
impl Gateway {
    /// A gateway, and in a cluster its link to Redis, started.
    pub fn new(
        config: Config,
        demo: Option<Arc<Demo>>,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Gateway> {
        let metrics = Arc::new(Metrics::default());
        let callbacks = config
            .callback_url
            .clone()
            .map(|url| Arc::new(Callbacks::new(url, &config, metrics.clone())));
        let emptied = cluster.clone().map(|cluster| -> channels::Emptied {
            Box::new(move |name| cluster.channel_emptied(name))
        });
        let history = (config.history_size > 0 && cluster.is_none()).then(|| {
            memory::Store::new(
                config.history_size,
                config.history_ttl,
                config.history_max_bytes,
            )
        });
        let gateway = Arc::new(Gateway {
            history,
            config,
            demo,
            registry: Registry::with_node(cluster.as_ref().map(|c| c.node)),
            channels: Channels::with_emptied(emptied),
            metrics,
            callbacks,
            cluster,
            draining: AtomicBool::new(false),
            admitted: AtomicUsize::new(0),
        });
        if let Some(cluster) = &gateway.cluster {
            cluster.start(Arc::downgrade(&gateway));
        }
        if gateway.history.is_some() {
            tokio::spawn(expire_history(Arc::downgrade(&gateway)));
        }
        gateway
    }

    /// Whether published events carry positions and streams resume (`HISTORY_SIZE` > 0).
    pub fn history_on(&self) -> bool {
        self.config.history_size > 0
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
    ///
    /// `last_event_id` is the position the client came back with (history on only): the stream
    /// resumes from it in the channels its connect callback decided, before it is accepted.
    pub async fn open(
        self: &Arc<Self>,
        request: Bytes,
        last_event_id: Option<String>,
    ) -> Result<StreamGuard, OpenError> {
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
        let (mut answer_tx, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let slot = tokio::select! {
                slot = callbacks.connect_slot() => slot,
                // The client left while its connect waited for a slot: the backend never hears
                // of this token, so it is owed nothing.
                () = answer_tx.closed() => {
                    gateway.registry.remove(stream.token);
                    gateway.release();
                    return;
                }
            };
            let outcome = callbacks.connect(slot, stream.token, &stream.request).await;
            let result = match outcome {
                Outcome::Accepted(answer) => {
                    let limit = gateway.config.max_channels_per_stream;
                    let parsed = connect_channels(&answer);
                    // A stream that came without a position starts from the one before its join
                    // and catches up from there as a resume does: what is published meanwhile is
                    // neither lost nor doubled.
                    let start = match (&parsed, &last_event_id) {
                        (Ok(names), None) if gateway.history_on() && !names.is_empty() => {
                            gateway.position().await
                        }
                        _ => None,
                    };
                    let joined = parsed.and_then(|names| {
                        gateway
                            .channels
                            .join(&stream, names.iter().map(String::as_str), limit)
                            .map(|()| names)
                            .map_err(|_| ())
                    });
                    if joined.is_err() {
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
                    }
                    let names = joined.unwrap_or_default();
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    if let Some(cluster) = &gateway.cluster {
                        // Reachable by a publish through any node before the client hears 200.
                        cluster.watch(names.iter().copied()).await;
                    }
                    if gateway.history_on() && !names.is_empty() {
                        // After the join: what is published from here on is live, the rest
                        // kept, and [`Stream::resume`] merges the two.
                        let from = match (&last_event_id, start) {
                            (Some(last), _) => Some(CatchUp::Resume(last)),
                            (None, Some(start)) => Some(CatchUp::Start(start)),
                            // No position to be had (Redis unreachable): opens as without history.
                            (None, None) => None,
                        };
                        if let Some(from) = from {
                            gateway.catch_up(&stream, &names, from).await;
                        }
                    }
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
                        "stream refused: connect callback to {}: {refused} token={}",
                        callbacks.url(),
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
        answered.await.unwrap_or_else(|_| {
            Err(OpenError::Callback(Outcome::Unavailable(
                "connect task ended".into(),
            )))
        })
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
            callbacks.disconnect(stream.token, reason, stream.request.clone());
        }
    }

    /// The open stream a token names: registered and accepted by its connect callback.
    fn open_stream(&self, token: &str) -> Option<Arc<Stream>> {
        Token::parse(token).and_then(|token| self.accepted(token))
    }

    fn accepted(&self, token: Token) -> Option<Arc<Stream>> {
        self.registry
            .get(token)
            .filter(|stream| stream.is_accepted())
    }

    /// The token and cluster when `token` is another node's; `None` for a local (or malformed)
    /// one, and always on a single node.
    fn remote(&self, token: &str) -> Option<(&Cluster, Token)> {
        let cluster = self.cluster.as_deref()?;
        let token = Token::parse(token)?;
        let remote = !cluster.is_local(token)
            // A node that shares this node's number may hold what is not here.
            || (cluster.is_shared() && self.registry.get(token).is_none());
        remote.then_some((cluster, token))
    }

    /// `/internal/send`: the event (if any) to one stream by token, then its end with `close`.
    pub async fn send(&self, send: &command::Send<'_>) -> Result<(), SendError> {
        self.send_to(send, None).await
    }

    /// `/internal/publish`: one frame, encoded once, to every member of any listed channel, each
    /// stream once; in a cluster, on every node. Counts the streams it was queued or written on.
    pub async fn publish(&self, publish: &command::Publish<'_>) -> Result<Published, ClusterError> {
        self.publish_to(publish, None).await
    }

    /// The operations of one `/internal/batch` (PROTOCOL §12), applied in the order they are
    /// called; see [`Batch`].
    pub fn batch(&self) -> Batch<'_> {
        self.metrics.batches_total.fetch_add(1, Ordering::Relaxed);
        Batch {
            gateway: self,
            pending: Vec::new(),
            deliveries: 0,
            bytes: 0,
            scratch: Vec::new(),
        }
    }

    async fn send_to(
        &self,
        send: &command::Send<'_>,
        batch: Option<&mut Batch<'_>>,
    ) -> Result<(), SendError> {
        let encode = || send.event.as_ref().map(frame::encode);
        if let Some((cluster, token)) = self.remote(send.token) {
            let frame = encode();
            let rest: &[&[u8]] = match &frame {
                Some(frame) => &[frame],
                None => &[],
            };
            return match cluster
                .ask(token, Ask::Send { close: send.close }, rest)
                .await
            {
                Ok((Code::Ok, _)) => Ok(()),
                Ok((Code::Overflowed, _)) => Err(SendError::Overflowed),
                Ok(_) => Err(SendError::NotFound),
                Err(err) => Err(SendError::Cluster(err)),
            };
        }
        // Looked up before the frame is encoded: a send to a gone token costs no encoding.
        let stream = self.open_stream(send.token).ok_or(SendError::NotFound)?;
        self.send_local(&stream, encode().as_ref(), send.close, batch)
    }

    fn send_local(
        &self,
        stream: &Arc<Stream>,
        frame: Option<&Bytes>,
        close: bool,
        batch: Option<&mut Batch<'_>>,
    ) -> Result<(), SendError> {
        match self.deliver(stream, frame, close, batch, 0) {
            Ok(true) => {
                log!(
                    Level::Debug,
                    "send accepted (close={close}) token={}",
                    stream.token
                );
                Ok(())
            }
            Ok(false) => Err(SendError::NotFound),
            Err(Overflowed) => Err(SendError::Overflowed),
        }
    }

    async fn publish_to(
        &self,
        publish: &command::Publish<'_>,
        batch: Option<&mut Batch<'_>>,
    ) -> Result<Published, ClusterError> {
        let recorded = self.history_on() && publish.event.is_some();
        if let Some(cluster) = &self.cluster {
            let frame = publish.event.as_ref().map(frame::encode);
            // Every node's members, this node's too, get the frame through Redis: a publish
            // Redis refused delivered nothing anywhere (PROTOCOL §10). With history, Redis gives
            // the event its position and keeps it in the same step.
            return cluster
                .publish(&publish.channels, frame.as_ref(), publish.close, recorded)
                .await;
        }
        let delivered = match (&self.history, &publish.event) {
            (Some(history), Some(event)) => {
                // Positions are handed out and delivered in one order (see `Store::order`).
                let _order = history.order.lock().await;
                let (position, frame) = history.record(&publish.channels, event);
                let frame = Some(&frame);
                self.fan_out(&publish.channels, frame, publish.close, batch, position.seq)
                    .await
            }
            _ => {
                let frame = publish.event.as_ref().map(frame::encode);
                self.fan_out(&publish.channels, frame.as_ref(), publish.close, batch, 0)
                    .await
            }
        };
        Ok(Published {
            delivered: delivered as u64,
            complete: true,
        })
    }

    /// Delivers `frame` to this node's members of any of `names`, in chunks between yields.
    /// `seq`: the frame's position with history on, else 0.
    async fn fan_out(
        &self,
        names: &[&str],
        frame: Option<&Bytes>,
        close: bool,
        mut batch: Option<&mut Batch<'_>>,
        seq: u64,
    ) -> usize {
        let members = self.channels.members_of_any(names.iter().copied());
        let frame_len = frame.map_or(0, Bytes::len).max(1);
        let chunk_len = FANOUT_CHUNK.min(FANOUT_CHUNK_BYTES / frame_len).max(1);
        let mut delivered = 0;
        for (i, chunk) in members.chunks(chunk_len).enumerate() {
            if i > 0 {
                if let Some(batch) = batch.as_deref_mut() {
                    batch.flush();
                }
                tokio::task::yield_now().await;
            }
            for stream in chunk {
                let batch = batch.as_deref_mut();
                if matches!(self.deliver(stream, frame, close, batch, seq), Ok(true)) {
                    delivered += 1;
                }
            }
        }
        self.metrics.publishes_total.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .publish_deliveries_total
            .fetch_add(delivered as u64, Ordering::Relaxed);
        log!(
            Level::Debug,
            "publish to {names:?} delivered to {delivered} of {} streams",
            members.len()
        );
        delivered
    }

    /// `/internal/subscribe`: all of the channels, or none if that would pass
    /// `MAX_CHANNELS_PER_STREAM`.
    pub async fn subscribe(&self, change: &command::Membership<'_>) -> Result<(), MembershipError> {
        if let Some((cluster, token)) = self.remote(change.token) {
            return forward_membership(cluster, token, Ask::Subscribe, &change.channels).await;
        }
        let stream = self
            .open_stream(change.token)
            .ok_or(MembershipError::NotFound)?;
        self.join(&stream, &change.channels)
            .await
            .map_err(MembershipError::TooManyChannels)
    }

    /// `/internal/unsubscribe`: leaving a channel not joined is not an error.
    pub async fn unsubscribe(
        &self,
        change: &command::Membership<'_>,
    ) -> Result<(), MembershipError> {
        if let Some((cluster, token)) = self.remote(change.token) {
            return forward_membership(cluster, token, Ask::Unsubscribe, &change.channels).await;
        }
        let stream = self
            .open_stream(change.token)
            .ok_or(MembershipError::NotFound)?;
        self.channels
            .leave(&stream, change.channels.iter().copied());
        Ok(())
    }

    /// Joins `names` and, in a cluster, returns once a publish through any node reaches them.
    async fn join(&self, stream: &Arc<Stream>, names: &[&str]) -> Result<(), TooManyChannels> {
        self.channels.join(
            stream,
            names.iter().copied(),
            self.config.max_channels_per_stream,
        )?;
        if let Some(cluster) = &self.cluster {
            cluster.watch(names.iter().copied()).await;
        }
        Ok(())
    }

    /// A request another node forwarded for one of this node's tokens (PROTOCOL §10), applied as
    /// the same request made here would be; the answer goes back to that node.
    pub(crate) async fn apply_forwarded(&self, token: Token, ask: Ask, rest: Bytes) -> (Code, u64) {
        let Some(stream) = self.accepted(token) else {
            return (Code::NotFound, 0);
        };
        match ask {
            Ask::Send { close } => {
                let frame = (!rest.is_empty()).then(|| rest.clone());
                match self.send_local(&stream, frame.as_ref(), close, None) {
                    Ok(()) => (Code::Ok, 0),
                    Err(SendError::Overflowed) => (Code::Overflowed, 0),
                    Err(_) => (Code::NotFound, 0),
                }
            }
            Ask::Subscribe => {
                let names: Vec<&str> = message::names(&rest).collect();
                match self.join(&stream, &names).await {
                    Ok(()) => (Code::Ok, 0),
                    Err(TooManyChannels { limit }) => (Code::TooManyChannels, limit as u64),
                }
            }
            Ask::Unsubscribe => {
                self.channels.leave(&stream, message::names(&rest));
                (Code::Ok, 0)
            }
        }
    }

    /// A publish that reached this node through Redis: its members of any of `names`.
    pub(crate) async fn deliver_published(
        &self,
        names: &[&str],
        frame: Option<Bytes>,
        close: bool,
    ) -> usize {
        let seq = match &frame {
            Some(frame) if self.history_on() => history::position_of(frame).map_or(0, |p| p.seq),
            _ => 0,
        };
        self.fan_out(names, frame.as_ref(), close, None, seq).await
    }

    /// The newest position handed out, as of now: where a new stream starts. On one node it is
    /// taken between fan-outs, so every publish up to it has listed its members already.
    async fn position(&self) -> Option<history::Position> {
        match (&self.history, &self.cluster) {
            (Some(history), _) => {
                let _order = history.order.lock().await;
                Some(history.snapshot(&[], u64::MAX).0.position)
            }
            (None, Some(cluster)) => Some(cluster.history(&[], u64::MAX).await.ok()?.0.position),
            (None, None) => None,
        }
    }

    /// Puts what `stream` missed in `names` since `from` before its live events (PROTOCOL §11), or
    /// the gap event when that cannot be done. Called after the join.
    async fn catch_up(&self, stream: &Stream, names: &[&str], from: CatchUp<'_>) {
        let after = match from {
            CatchUp::Resume(last) => history::Position::parse(last).map_or(u64::MAX, |p| p.seq),
            CatchUp::Start(start) => start.seq,
        };
        let snapshot = match (&self.history, &self.cluster) {
            (Some(history), _) => Ok(history.snapshot(names, after)),
            (None, Some(cluster)) => cluster.history(names, after).await,
            (None, None) => return,
        };
        let max = self.config.max_queue_bytes;
        let (last, now, kept) = match (from, snapshot) {
            (CatchUp::Resume(last), Ok((now, kept))) => (last, now, kept),
            (CatchUp::Resume(_), Err(_)) => {
                // Neither a resume nor a gap can be told without the history: the page
                // reconnects by itself after this clean end, and resumes once Redis answers.
                log!(
                    Level::Warn,
                    "cluster: history unreachable, ending the resuming stream token={}",
                    stream.token
                );
                self.end(stream, EndReason::ServerClosed);
                return;
            }
            (CatchUp::Start(_), Err(_)) => return,
            (CatchUp::Start(start), Ok((now, kept))) => {
                // The position first, then what the channels kept since just before the join.
                // A new stream's page has no state to reload, so a loss in that window (a
                // channel's size bound passed while the join ran) is no gap here; its position
                // tells if the page ever resumes from it.
                let replay = history::kept_after(start.seq, kept);
                let frames = std::iter::once((start.seq, history::position_frame(&start)))
                    .chain(replay.into_iter().map(|(at, frame)| (at.seq, frame)))
                    .collect();
                if !stream.catch_up(frames, start.seq, now.position.seq, max) {
                    self.end(stream, EndReason::Error);
                }
                return;
            }
        };
        let gap = match history::resolve(last, now, self.config.history_ttl, kept) {
            Resume::Complete {
                frames,
                after,
                through,
            } => {
                // A replay larger than the stream's queue bound cannot be written: a gap too.
                (!stream.catch_up(frames, after, through, max)).then(|| history::gap(last, &now))
            }
            Resume::Gap { frame, through } => Some((frame, through)),
        };
        let complete = gap.is_none();
        if let Some((frame, through)) = gap {
            if !stream.catch_up(vec![(through, frame)], through, through, max) {
                self.end(stream, EndReason::Error);
            }
        }
        self.metrics.resumed(complete);
        log!(
            Level::Debug,
            "resume from {last:?}: {} token={}",
            if complete { "complete" } else { "gap" },
            stream.token
        );
    }

    /// Queues `frame` (if any) on `stream` and, with `close`, ends it after the frame; reports the
    /// end it causes (`server_closed`, or `error` on overflow). `Ok(false)`: the stream had already
    /// ended and nothing was queued. In a batch, a frame without `close` is only queued, for the
    /// batch's flush to write.
    fn deliver(
        &self,
        stream: &Arc<Stream>,
        frame: Option<&Bytes>,
        close: bool,
        batch: Option<&mut Batch<'_>>,
        seq: u64,
    ) -> Result<bool, Overflowed> {
        let delivery = match (frame, batch) {
            (Some(frame), Some(batch)) if !close => batch.defer(stream, frame, seq),
            _ => stream.deliver(frame, close, self.config.max_queue_bytes, seq),
        };
        match delivery {
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
            Delivery::Written => {
                let frame = frame.expect("a direct write carries a frame");
                self.metrics
                    .events_sent_total
                    .fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .bytes_sent_total
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                self.metrics
                    .socket_writes_total
                    .fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Delivery::AlreadyEnded | Delivery::Replayed => Ok(false),
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

    /// This node rejoined Redis after losing it. With history on, its streams in channels may have
    /// missed publishes meanwhile (other nodes took them while this one listened to nothing), and
    /// a live stream cannot be told so: they end cleanly, and their pages reconnect and resume
    /// from the history, exactly or with `gateway.gap` (PROTOCOL §11: never a silent skip).
    pub(crate) fn rejoined(&self) {
        if !self.history_on() {
            return;
        }
        let mut ended = 0;
        for stream in self.registry.snapshot() {
            if stream.is_accepted() && !stream.memberships.lock().is_empty() {
                self.end(&stream, EndReason::ServerClosed);
                ended += 1;
            }
        }
        if ended > 0 {
            log!(
                Level::Warn,
                "cluster: rejoined Redis; ended {ended} streams in channels so that they resume from the history"
            );
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

/// Where a stream's catch-up starts (see [`Gateway::catch_up`]).
#[derive(Clone, Copy)]
enum CatchUp<'a> {
    /// The position the page came back with, as received: a resume, or a gap.
    Resume(&'a str),
    /// A stream that came without a position: the one taken just before its join. Not counted as
    /// a resume, never a gap, and without Redis the stream just opens.
    Start(history::Position),
}

/// Drops expired history every second, until the gateway is gone.
async fn expire_history(gateway: std::sync::Weak<Gateway>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(gateway) = gateway.upgrade() else {
            return;
        };
        if let Some(history) = &gateway.history {
            history.expire();
        }
    }
}

/// A subscribe or unsubscribe for another node's token: that node's answer.
async fn forward_membership(
    cluster: &Cluster,
    token: Token,
    ask: Ask,
    names: &[&str],
) -> Result<(), MembershipError> {
    let names: Vec<&[u8]> = names.iter().map(|name| name.as_bytes()).collect();
    match cluster.ask(token, ask, &names).await {
        Ok((Code::Ok, _)) => Ok(()),
        Ok((Code::TooManyChannels, limit)) => {
            Err(MembershipError::TooManyChannels(TooManyChannels {
                limit: limit as usize,
            }))
        }
        Ok(_) => Err(MembershipError::NotFound),
        Err(err) => Err(MembershipError::Cluster(err)),
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

/// One `/internal/batch`'s operations (PROTOCOL §12), applied in call order with the answers of the
/// single routes. Frames are queued on their streams without waking the writers, so each stream
/// touched gets all of the batch's frames for it in one `writev` when the batch flushes: at
/// [`Batch::pace`] once a chunk's worth of deliveries is queued (a big batch yields like a big
/// fan-out does), between a publish's chunks, and when the batch is dropped — also when the
/// request is abandoned half-way, so no frame is left queued with its writer asleep.
pub struct Batch<'g> {
    gateway: &'g Gateway,
    /// Streams with frames queued since the last flush; a stream may appear more than once.
    pending: Vec<Arc<Stream>>,
    /// Deliveries and frame bytes since the last flush.
    deliveries: usize,
    bytes: usize,
    /// The frames of one direct write, reused.
    scratch: Vec<Bytes>,
}

impl Batch<'_> {
    pub fn history_on(&self) -> bool {
        self.gateway.history_on()
    }

    pub async fn send(&mut self, send: &command::Send<'_>) -> Result<(), SendError> {
        let gateway = self.gateway;
        gateway.send_to(send, Some(self)).await
    }

    pub async fn publish(
        &mut self,
        publish: &command::Publish<'_>,
    ) -> Result<Published, ClusterError> {
        let gateway = self.gateway;
        gateway.publish_to(publish, Some(self)).await
    }

    pub async fn subscribe(
        &mut self,
        change: &command::Membership<'_>,
    ) -> Result<(), MembershipError> {
        self.gateway.subscribe(change).await
    }

    pub async fn unsubscribe(
        &mut self,
        change: &command::Membership<'_>,
    ) -> Result<(), MembershipError> {
        self.gateway.unsubscribe(change).await
    }

    /// Called between items: once a chunk's worth of frames is queued (as a fan-out counts
    /// them), writes them and yields to the scheduler.
    pub async fn pace(&mut self) {
        if self.deliveries >= FANOUT_CHUNK || self.bytes >= FANOUT_CHUNK_BYTES {
            self.flush();
            tokio::task::yield_now().await;
        }
    }

    /// Queues `frame` on `stream` for the next flush. A queue full of this batch's frames is
    /// written first (as single requests would have been), so only a client that does not read
    /// overflows.
    fn defer(&mut self, stream: &Arc<Stream>, frame: &Bytes, seq: u64) -> Delivery {
        let max = self.gateway.config.max_queue_bytes;
        let delivery = loop {
            match stream.defer(frame, max, seq) {
                Ok(delivery) => break delivery,
                Err(Full) => self.flush_one(stream),
            }
        };
        if matches!(delivery, Delivery::Queued { .. }) {
            self.pending.push(stream.clone());
            self.deliveries += 1;
            self.bytes += frame.len();
        }
        delivery
    }

    fn flush_one(&mut self, stream: &Stream) {
        if let Some(len) = stream.flush(&mut self.scratch) {
            let metrics = &self.gateway.metrics;
            metrics
                .bytes_sent_total
                .fetch_add(len as u64, Ordering::Relaxed);
            metrics.socket_writes_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes every pending stream's queued frames: one `writev` each where the stream is idle,
    /// else its writer is woken.
    fn flush(&mut self) {
        self.deliveries = 0;
        self.bytes = 0;
        if self.pending.is_empty() {
            return;
        }
        if self.pending.len() > 1 {
            self.pending.sort_unstable_by_key(Arc::as_ptr);
            self.pending.dedup_by(|a, b| Arc::ptr_eq(a, b));
        }
        let mut pending = std::mem::take(&mut self.pending);
        for stream in pending.drain(..) {
            self.flush_one(&stream);
        }
        // Keep the allocation for the next flush.
        self.pending = pending;
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.flush();
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
