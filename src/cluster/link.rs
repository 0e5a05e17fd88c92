//! Link: this node's one connection to Redis, kept alive, and what arrives on it.
//!
//! Owns joining (connect, listen on the node's own channel, listen to every channel with a local
//! member, register in the live-node set), noticing loss (a heartbeat every second that must be
//! answered within two: a connection that looks open and carries nothing is dropped within ~3 s),
//! rejoining by itself with back-off, and channel interest: a node listens to a channel only while
//! it holds a member, and the (un)subscribe commands of many joins and leaves go out together, up to
//! `SUBSCRIBE_BATCH` channels a command. Arriving messages are applied in arrival order by one
//! dispatcher task through the gateway's own operations; it never writes to a socket itself.
//!
//! redis-rs reconnects nothing here on purpose: a rejoin must restore interest in batches and be
//! known to be complete before the node says it is ready, so this module decides when to connect.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::message::{self, Code, Message, Origin};
use super::{Cluster, Keys};
use crate::gateway::Gateway;
use crate::{log, log::Level};

/// Channels per SUBSCRIBE/UNSUBSCRIBE command (Centrifuge batches 512 too): 100k channels rejoin
/// in ~200 commands, sent together.
const SUBSCRIBE_BATCH: usize = 512;
/// Interest changes taken off the queue in one round before their commands go out.
const MAX_CHANGES_PER_ROUND: usize = 4096;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A heartbeat (or any join step) not answered within this is a dead link (PROTOCOL §10: noticed
/// within 5 s; this notices within ~3).
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// How long a node stays in the live set after its last heartbeat.
const NODE_TTL_MS: u64 = 3_000;
const RETRY_MIN: Duration = Duration::from_millis(50);
/// Rejoin attempts back off to this, so a Redis that comes back is used within ~0.5 s (§10: 2 s).
const RETRY_MAX: Duration = Duration::from_millis(500);
/// Multi-channel publishes remembered to deliver each once, though it arrives once per channel.
const RECENT_PUBLISHES: usize = 4096;
/// Publishes fanning out at once on this node. Past it the dispatcher waits for one to finish, so a
/// flood of publishes queues as messages (a frame each), not as fan-outs holding member lists, and
/// a message that waited past its sender's deadline is dropped unapplied when its turn comes.
const MAX_FANOUTS: usize = 64;

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Takes the first node number from `start` on that no node holds, atomically (`SET NX`), so nodes
/// that start together never pick the same one. `None`: all 256 are held.
pub(super) async fn claim_number(
    client: &redis::Client,
    keys: &Keys,
    instance: u64,
    start: u8,
) -> redis::RedisResult<Option<u8>> {
    let mut connection = client.get_multiplexed_async_connection().await?;
    for offset in 0..=255u8 {
        let node = start.wrapping_add(offset);
        let taken: Option<String> = redis::cmd("SET")
            .arg(keys.claim(node))
            .arg(format!("{instance:016x}"))
            .arg("NX")
            .arg("PX")
            .arg(NODE_TTL_MS)
            .query_async(&mut connection)
            .await?;
        if taken.is_some() {
            return Ok(Some(node));
        }
    }
    Ok(None)
}

enum Change {
    /// Listen to these channels; answer when Redis confirmed.
    Watch(Vec<Arc<str>>, oneshot::Sender<()>),
    /// This channel lost its last local member.
    Unwatch(Arc<str>),
}

/// Which channels this node listens to (`true`: Redis confirmed), and the queue of changes to it.
pub(super) struct Interest {
    listening: Mutex<HashMap<Arc<str>, bool>>,
    changes: mpsc::UnboundedSender<Change>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Change>>>,
}

impl Default for Interest {
    fn default() -> Self {
        let (changes, receiver) = mpsc::unbounded_channel();
        Interest {
            listening: Mutex::new(HashMap::new()),
            changes,
            receiver: Mutex::new(Some(receiver)),
        }
    }
}

impl Interest {
    pub(super) fn unwatch(&self, name: Arc<str>) {
        let _ = self.changes.send(Change::Unwatch(name));
    }
}

impl Cluster {
    /// Makes sure this node listens to each of `names` before returning, so a publish through any
    /// node after this reaches the stream that just joined them. While Redis is down it returns at
    /// once: the next join listens to every channel with a local member. (Queued even then: a change
    /// made while a join is under way, after its snapshot of the channels, is applied after it.)
    pub async fn watch<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut missing: Vec<Arc<str>> = Vec::new();
        {
            let mut listening = self.interest.listening.lock();
            for name in names {
                if listening.get(name) != Some(&true) {
                    let name: Arc<str> = Arc::from(name);
                    listening.entry(name.clone()).or_insert(false);
                    missing.push(name);
                }
            }
        }
        if missing.is_empty() {
            return;
        }
        let (done, confirmed) = oneshot::channel();
        let queued = self
            .interest
            .changes
            .send(Change::Watch(missing, done))
            .is_ok();
        // Down: nobody would confirm before the timeout (a join against a Redis that does not
        // answer takes its own time), and the rejoin listens to these channels anyway.
        if queued && self.is_up() {
            // Err: the link failed first; its rejoin restores the interest.
            let _ = tokio::time::timeout(self.timeout, confirmed).await;
        }
    }
}

/// The link's life: join, serve until the connection fails, rejoin; ends with the gateway.
pub(super) async fn run(cluster: Arc<Cluster>, gateway: Weak<Gateway>) {
    let mut changes = cluster
        .interest
        .receiver
        .lock()
        .take()
        .expect("the link runs once");
    let mut retry = RETRY_MIN;
    let mut reported = false;
    let mut joined_before = false;
    loop {
        match join(&cluster, &gateway).await {
            Ok(connection) => {
                retry = RETRY_MIN;
                reported = false;
                if std::mem::replace(&mut joined_before, true) {
                    if let Some(gateway) = gateway.upgrade() {
                        gateway.rejoined();
                    }
                }
                let why = serve(&cluster, &gateway, connection, &mut changes).await;
                cluster.set_down(&why);
            }
            Err(why) => {
                if !reported {
                    log!(
                        Level::Warn,
                        "cluster: cannot join Redis ({why}); not ready, retrying every {RETRY_MAX:?} or sooner"
                    );
                    reported = true;
                }
                // Changes meanwhile are answered (their senders dropped): the next join listens
                // to every channel with a local member anyway.
                let pause = tokio::time::sleep(retry);
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        () = &mut pause => break,
                        change = changes.recv() => if change.is_none() { return },
                    }
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
        if gateway.strong_count() == 0 {
            return;
        }
    }
}

type Joined = (MultiplexedConnection, mpsc::UnboundedReceiver<PushInfo>);

/// Awaits a Redis step for at most `limit`; the error names the step.
async fn within<T>(
    what: &str,
    limit: Duration,
    step: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(format!("{what}: {err}")),
        Err(_) => Err(format!("{what}: no answer within {limit:?}")),
    }
}

async fn join(cluster: &Arc<Cluster>, gateway: &Weak<Gateway>) -> Result<Joined, String> {
    let (pushes, received) = mpsc::unbounded_channel();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(ANSWER_WITHIN))
        .set_push_sender(pushes);
    let connect = cluster
        .client
        .get_multiplexed_async_connection_with_config(&config);
    let mut connection = within("connect", ANSWER_WITHIN, connect).await?;
    let own = cluster.keys.node_channel(cluster.node);
    within("subscribe", ANSWER_WITHIN, connection.subscribe(own)).await?;
    // Named in the live set, so that the others can close this connection (and with it this
    // node's subscriptions) if this node ever stops answering without closing it.
    let client_id: u64 = within(
        "client id",
        ANSWER_WITHIN,
        redis::cmd("CLIENT").arg("ID").query_async(&mut connection),
    )
    .await?;
    cluster.client_id.store(client_id, Ordering::Relaxed);
    let gateway = gateway.upgrade().ok_or("the gateway is gone")?;
    // Interest is rebuilt from what is local now; changes queued meanwhile follow it in order.
    let names = gateway.channels.names();
    *cluster.interest.listening.lock() = names.iter().map(|name| (name.clone(), true)).collect();
    // ~1 ms per 50 channels on top of the usual bound: 100k channels may take 2 s more.
    let limit = ANSWER_WITHIN + Duration::from_millis(names.len() as u64 / 50);
    within(
        "restoring channel interest",
        limit,
        subscribe_all(&cluster.keys, &connection, &names, true),
    )
    .await?;
    heartbeat(cluster, &mut connection).await?;
    *cluster.connection.lock() = Some(connection.clone());
    cluster.up.store(true, Ordering::Release);
    log!(
        Level::Info,
        "cluster: joined Redis as node {} ({} channels, {} nodes)",
        cluster.node,
        names.len(),
        cluster.nodes.load(Ordering::Relaxed)
    );
    Ok((connection, received))
}

/// (Un)subscribes `names`, `SUBSCRIBE_BATCH` a command, all commands in flight at once.
async fn subscribe_all(
    keys: &Keys,
    connection: &MultiplexedConnection,
    names: &[Arc<str>],
    subscribe: bool,
) -> redis::RedisResult<()> {
    let mut commands = JoinSet::new();
    for chunk in names.chunks(SUBSCRIBE_BATCH) {
        let keys: Vec<String> = chunk.iter().map(|name| keys.channel(name)).collect();
        let mut connection = connection.clone();
        commands.spawn(async move {
            if subscribe {
                connection.subscribe(keys).await
            } else {
                connection.unsubscribe(keys).await
            }
        });
    }
    while let Some(done) = commands.join_next().await {
        done.map_err(|err| redis::RedisError::from(std::io::Error::other(err)))??;
    }
    Ok(())
}

/// Registers this node in the live set (and renews its number's claim), reads the set, and counts
/// out the nodes whose registration ran out: their Redis connections are closed (`CLIENT KILL`), so
/// a node that went silent without closing its connection (power loss, a frozen process) stops
/// counting as a listener, and its tokens are 404 from then on instead of timeouts. Also the
/// link's liveness probe.
async fn heartbeat(
    cluster: &Cluster,
    connection: &mut MultiplexedConnection,
) -> Result<(), String> {
    let now = now_ms();
    let instance = format!("{:016x}", cluster.instance);
    let member = format!(
        "{}:{instance}:{}",
        cluster.node,
        cluster.client_id.load(Ordering::Relaxed)
    );
    let nodes = cluster.keys.nodes();
    let mut pipeline = redis::pipe();
    pipeline
        .cmd("SET")
        .arg(cluster.keys.claim(cluster.node))
        .arg(&instance)
        .arg("PX")
        .arg(NODE_TTL_MS)
        .ignore()
        .cmd("ZADD")
        .arg(&nodes)
        .arg(now + NODE_TTL_MS)
        .arg(member)
        .ignore()
        .cmd("ZRANGEBYSCORE")
        .arg(&nodes)
        .arg("-inf")
        .arg(now)
        .cmd("ZRANGEBYSCORE")
        .arg(&nodes)
        .arg(format!("({now}"))
        .arg("+inf");
    let (expired, live): (Vec<String>, Vec<String>) =
        within("heartbeat", ANSWER_WITHIN, pipeline.query_async(connection)).await?;
    if !expired.is_empty() {
        let mut pipeline = redis::pipe();
        for member in &expired {
            pipeline.cmd("ZREM").arg(&nodes).arg(member).ignore();
            if let Some(client_id) = member.rsplit(':').next() {
                // Fails harmlessly when the connection is gone already or another node was first.
                pipeline
                    .cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(client_id)
                    .ignore();
            }
        }
        let counted_out: redis::RedisResult<()> = pipeline.query_async(connection).await;
        log!(
            Level::Warn,
            "cluster: counted out {} silent node(s) {expired:?}: {}",
            expired.len(),
            counted_out.map_or_else(|err| err.to_string(), |()| "done".into())
        );
    }
    let own = cluster.node.to_string();
    let shared = live.iter().any(|member| {
        let mut parts = member.split(':');
        parts.next() == Some(own.as_str()) && parts.next() != Some(instance.as_str())
    });
    let was_shared = cluster.shared.swap(shared, Ordering::Relaxed);
    if shared && !was_shared {
        log!(
            Level::Warn,
            "cluster: node number {} is also another live node's (both chose it while Redis was unreachable): its tokens still reach their streams, at one Redis round trip more for a token not held here",
            cluster.node
        );
    }
    cluster.nodes.store(live.len(), Ordering::Relaxed);
    Ok(())
}

/// Serves a joined link until it fails; returns why.
async fn serve(
    cluster: &Arc<Cluster>,
    gateway: &Weak<Gateway>,
    (mut connection, pushes): Joined,
    changes: &mut mpsc::UnboundedReceiver<Change>,
) -> String {
    let (lost_tx, mut lost) = oneshot::channel();
    let (replies, queued) = mpsc::unbounded_channel();
    let replier = tokio::spawn(send_replies(cluster.clone(), connection.clone(), queued));
    let replies = Replies {
        cluster: cluster.clone(),
        queue: replies,
    };
    let dispatcher = tokio::spawn(dispatch(gateway.clone(), pushes, replies, lost_tx));
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let why = loop {
        tokio::select! {
            _ = &mut lost => break "the connection closed".to_owned(),
            _ = tick.tick() => {
                if let Err(why) = heartbeat(cluster, &mut connection).await {
                    break why;
                }
            }
            change = changes.recv() => {
                let Some(change) = change else { break "shutting down".to_owned() };
                if let Err(why) = apply_changes(cluster, gateway, &connection, change, changes).await {
                    break why;
                }
            }
        }
    };
    dispatcher.abort();
    replier.abort();
    why
}

/// Applies `first` and the changes queued behind it, in order, one command per run of the same
/// kind (so a leave and a rejoin of one channel end subscribed).
async fn apply_changes(
    cluster: &Cluster,
    gateway: &Weak<Gateway>,
    connection: &MultiplexedConnection,
    first: Change,
    changes: &mut mpsc::UnboundedReceiver<Change>,
) -> Result<(), String> {
    let mut round = vec![first];
    while round.len() < MAX_CHANGES_PER_ROUND {
        match changes.try_recv() {
            Ok(change) => round.push(change),
            Err(_) => break,
        }
    }
    let gateway = gateway.upgrade().ok_or("the gateway is gone")?;
    let mut round = round.into_iter().peekable();
    while let Some(change) = round.next() {
        match change {
            Change::Watch(names, done) => {
                let mut names: HashSet<Arc<str>> = names.into_iter().collect();
                let mut waiters = vec![done];
                while let Some(Change::Watch(more, done)) =
                    round.next_if(|change| matches!(change, Change::Watch(..)))
                {
                    names.extend(more);
                    waiters.push(done);
                }
                let names: Vec<Arc<str>> = names.into_iter().collect();
                within(
                    "subscribe",
                    ANSWER_WITHIN,
                    subscribe_all(&cluster.keys, connection, &names, true),
                )
                .await?;
                {
                    let mut listening = cluster.interest.listening.lock();
                    for name in &names {
                        if let Some(confirmed) = listening.get_mut(name) {
                            *confirmed = true;
                        }
                    }
                }
                waiters.into_iter().for_each(|done| {
                    let _ = done.send(());
                });
            }
            Change::Unwatch(name) => {
                let mut names = vec![name];
                while let Some(Change::Unwatch(name)) =
                    round.next_if(|change| matches!(change, Change::Unwatch(_)))
                {
                    names.push(name);
                }
                // A channel joined again since it emptied keeps its subscription.
                {
                    let mut listening = cluster.interest.listening.lock();
                    names.retain(|name| {
                        !gateway.channels.contains(name) && listening.remove(name).is_some()
                    });
                }
                if !names.is_empty() {
                    within(
                        "unsubscribe",
                        ANSWER_WITHIN,
                        subscribe_all(&cluster.keys, connection, &names, false),
                    )
                    .await?;
                }
            }
        }
    }
    Ok(())
}

/// Applies what arrives, in arrival order, until the connection closes. Requests for a token are
/// applied here, one after the other, so a node's sends reach a stream in the order it made them;
/// a publish's fan-out runs in a task of its own, so a fan-out to thousands of streams does not hold
/// up the sends behind it (a publish is answered when its fan-out is done, so a publish and a send
/// made one after the other by the backend still arrive in that order).
async fn dispatch(
    gateway: Weak<Gateway>,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    replies: Replies,
    lost: oneshot::Sender<()>,
) {
    let mut recent = Recent::default();
    // With history, a stream must get events in position order (PROTOCOL §11): one fan-out at a
    // time, in the order Redis published them.
    let history = gateway.upgrade().is_some_and(|g| g.history_on());
    let fanouts = Arc::new(tokio::sync::Semaphore::new(if history {
        1
    } else {
        MAX_FANOUTS
    }));
    while let Some(push) = pushes.recv().await {
        match push.kind {
            PushKind::Disconnection => break,
            PushKind::Message => {
                let Some(Value::BulkString(payload)) = push.data.into_iter().nth(1) else {
                    continue;
                };
                let Some(gateway) = gateway.upgrade() else {
                    break;
                };
                handle(&gateway, &replies, &mut recent, &fanouts, payload.into()).await;
            }
            // Subscribe confirmations and the like: redis-rs has matched them to their commands.
            _ => {}
        }
    }
    let _ = lost.send(());
}

async fn handle(
    gateway: &Arc<Gateway>,
    replies: &Replies,
    recent: &mut Recent,
    fanouts: &Arc<tokio::sync::Semaphore>,
    payload: Bytes,
) {
    match message::decode(&payload) {
        None => log!(
            Level::Warn,
            "cluster: dropped a message of {} bytes that is not in this version's format",
            payload.len()
        ),
        Some(Message::Reply {
            instance,
            id,
            code,
            value,
        }) => {
            if instance == replies.cluster.instance {
                replies.cluster.replied(id, code, value);
            }
        }
        Some(Message::Request { origin, .. } | Message::Publish { origin, .. })
            if origin.expires_ms < now_ms() && !kept(gateway, &payload) =>
        {
            // Its asker answered 503/504 already (Redis stalled, or this node was too busy):
            // carrying it out now would make that answer a lie.
            log!(
                Level::Debug,
                "cluster: dropped a request from node {} that expired {} ms ago",
                origin.node,
                now_ms() - origin.expires_ms
            );
        }
        Some(Message::Request {
            origin,
            token,
            ask,
            rest,
        }) => {
            let rest = payload.slice_ref(rest);
            let (code, value) = gateway.apply_forwarded(token, ask, rest).await;
            replies.send(origin, code, value);
        }
        Some(Message::Publish {
            origin,
            close,
            names,
            frame_at,
        }) => {
            // A publish to several channels arrives once per channel this node listens to.
            if names.contains(&b'\n') && !recent.first(origin) {
                replies.send(origin, Code::Delivered, 0);
                return;
            }
            let Ok(permit) = fanouts.clone().acquire_owned().await else {
                return;
            };
            if origin.expires_ms < now_ms() && !kept(gateway, &payload) {
                return;
            }
            let names = payload.slice_ref(names);
            let frame = (frame_at < payload.len()).then(|| payload.slice(frame_at..));
            let (gateway, replies) = (gateway.clone(), replies.clone());
            tokio::spawn(async move {
                let names: Vec<&str> = message::names(&names).collect();
                let delivered = gateway.deliver_published(&names, frame, close).await;
                drop(permit);
                replies.send(origin, Code::Delivered, delivered as u64);
            });
        }
    }
}

/// Whether `payload` is a publish that history keeps: Redis gave it its position and replays it
/// to resuming streams, so a live stream must get it too, however late (a stream that misses it
/// and gets the next one would skip it silently).
fn kept(gateway: &Gateway, payload: &[u8]) -> bool {
    gateway.history_on() && payload.first() == Some(&message::PUBLISH)
}

/// Where this node's answers go: straight into the waiting request when the asker is this
/// process, else onto the queue that [`send_replies`] empties.
#[derive(Clone)]
struct Replies {
    cluster: Arc<Cluster>,
    queue: mpsc::UnboundedSender<(u8, Bytes)>,
}

impl Replies {
    fn send(&self, origin: Origin, code: Code, value: u64) {
        if origin.instance == self.cluster.instance {
            self.cluster.replied(origin.id, code, value);
        } else {
            let body = message::reply(origin.instance, origin.id, code, value);
            let _ = self.queue.send((origin.node, body));
        }
    }
}

/// Publishes queued answers to their askers' node channels: all that queued up while the previous
/// ones were in flight go out as one pipeline (one write), so under load a reply costs a fraction of
/// a round trip.
async fn send_replies(
    cluster: Arc<Cluster>,
    mut connection: MultiplexedConnection,
    mut queued: mpsc::UnboundedReceiver<(u8, Bytes)>,
) {
    let mut round = Vec::new();
    while queued.recv_many(&mut round, 1024).await > 0 {
        let mut pipeline = redis::pipe();
        for (node, body) in round.drain(..) {
            pipeline
                .cmd("PUBLISH")
                .arg(cluster.keys.node_channel(node))
                .arg(&body[..])
                .ignore();
        }
        let sent: redis::RedisResult<()> = pipeline.query_async(&mut connection).await;
        if let Err(err) = sent {
            log!(Level::Debug, "cluster: replies not sent: {err}");
        }
    }
}

/// The last `RECENT_PUBLISHES` multi-channel publishes seen.
#[derive(Default)]
struct Recent {
    seen: HashSet<(u64, u64)>,
    order: VecDeque<(u64, u64)>,
}

impl Recent {
    /// True the first time `origin`'s publish is seen.
    fn first(&mut self, origin: Origin) -> bool {
        let key = (origin.instance, origin.id);
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > RECENT_PUBLISHES {
            let oldest = self.order.pop_front().expect("not empty");
            self.seen.remove(&oldest);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(instance: u64, id: u64) -> Origin {
        Origin {
            instance,
            node: 1,
            id,
            expires_ms: 0,
        }
    }

    #[test]
    fn a_publish_is_first_once_and_forgotten_after_the_window() {
        let mut recent = Recent::default();
        assert!(recent.first(origin(1, 7)));
        assert!(!recent.first(origin(1, 7)));
        assert!(recent.first(origin(2, 7)), "another process's id 7");
        for id in 100..100 + RECENT_PUBLISHES as u64 {
            assert!(recent.first(origin(1, id)));
        }
        assert_eq!(recent.seen.len(), RECENT_PUBLISHES);
        assert!(recent.first(origin(1, 7)), "pushed out of the window");
    }
}
