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
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::message::{self, Code, Message, Origin};
use super::{channel_key, node_channel, Cluster, PREFIX};
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

fn nodes_key() -> String {
    format!("{PREFIX}nodes")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Node numbers that live nodes hold now (members of the live set are `<node>:<instance>`).
pub(super) async fn live_nodes(client: &redis::Client) -> redis::RedisResult<Vec<u8>> {
    let mut connection = client.get_multiplexed_async_connection().await?;
    let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(nodes_key())
        .arg(now_ms())
        .arg("+inf")
        .query_async(&mut connection)
        .await?;
    Ok(members
        .iter()
        .filter_map(|member| member.split(':').next()?.parse().ok())
        .collect())
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
    /// once: the rejoin listens to every channel with a local member.
    pub async fn watch<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        if !self.is_up() {
            return;
        }
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
        if self
            .interest
            .changes
            .send(Change::Watch(missing, done))
            .is_ok()
        {
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
    loop {
        match join(&cluster, &gateway).await {
            Ok(connection) => {
                retry = RETRY_MIN;
                reported = false;
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
    let own = node_channel(cluster.node);
    within("subscribe", ANSWER_WITHIN, connection.subscribe(own)).await?;
    let gateway = gateway.upgrade().ok_or("the gateway is gone")?;
    // Interest is rebuilt from what is local now; changes queued meanwhile follow it in order.
    let names = gateway.channels.names();
    *cluster.interest.listening.lock() = names.iter().map(|name| (name.clone(), true)).collect();
    // ~1 ms per 50 channels on top of the usual bound: 100k channels may take 2 s more.
    let limit = ANSWER_WITHIN + Duration::from_millis(names.len() as u64 / 50);
    within(
        "restoring channel interest",
        limit,
        subscribe_all(&connection, &names, true),
    )
    .await?;
    heartbeat(cluster, &mut connection).await?;
    *cluster.connection.lock() = Some(connection.clone());
    cluster.up.store(true, std::sync::atomic::Ordering::Release);
    log!(
        Level::Info,
        "cluster: joined Redis as node {} ({} channels, {} nodes)",
        cluster.node,
        names.len(),
        cluster.nodes.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok((connection, received))
}

/// (Un)subscribes `names`, `SUBSCRIBE_BATCH` a command, all commands in flight at once.
async fn subscribe_all(
    connection: &MultiplexedConnection,
    names: &[Arc<str>],
    subscribe: bool,
) -> redis::RedisResult<()> {
    let mut commands = JoinSet::new();
    for chunk in names.chunks(SUBSCRIBE_BATCH) {
        let keys: Vec<String> = chunk.iter().map(|name| channel_key(name)).collect();
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

/// Registers this node in the live set and reads how many nodes it holds; the link's liveness
/// probe too.
async fn heartbeat(
    cluster: &Cluster,
    connection: &mut MultiplexedConnection,
) -> Result<(), String> {
    let now = now_ms();
    let member = format!("{}:{:016x}", cluster.node, cluster.instance);
    let mut pipeline = redis::pipe();
    pipeline
        .cmd("ZADD")
        .arg(nodes_key())
        .arg(now + NODE_TTL_MS)
        .arg(member)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(nodes_key())
        .arg("-inf")
        .arg(now)
        .ignore()
        .cmd("ZCARD")
        .arg(nodes_key());
    let (nodes,): (usize,) =
        within("heartbeat", ANSWER_WITHIN, pipeline.query_async(connection)).await?;
    cluster
        .nodes
        .store(nodes, std::sync::atomic::Ordering::Relaxed);
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
    let dispatcher = tokio::spawn(dispatch(
        cluster.clone(),
        gateway.clone(),
        pushes,
        connection.clone(),
        lost_tx,
    ));
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
                while let Some(Change::Watch(..)) = round.peek() {
                    let Some(Change::Watch(more, done)) = round.next() else {
                        unreachable!("peeked")
                    };
                    names.extend(more);
                    waiters.push(done);
                }
                let names: Vec<Arc<str>> = names.into_iter().collect();
                within(
                    "subscribe",
                    ANSWER_WITHIN,
                    subscribe_all(connection, &names, true),
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
                while let Some(Change::Unwatch(_)) = round.peek() {
                    let Some(Change::Unwatch(name)) = round.next() else {
                        unreachable!("peeked")
                    };
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
                        subscribe_all(connection, &names, false),
                    )
                    .await?;
                }
            }
        }
    }
    Ok(())
}

/// Applies what arrives, in arrival order, until the connection closes.
async fn dispatch(
    cluster: Arc<Cluster>,
    gateway: Weak<Gateway>,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    connection: MultiplexedConnection,
    lost: oneshot::Sender<()>,
) {
    let mut recent = Recent::default();
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
                handle(&cluster, &gateway, &connection, &mut recent, payload.into()).await;
            }
            // Subscribe confirmations and the like: redis-rs has matched them to their commands.
            _ => {}
        }
    }
    let _ = lost.send(());
}

async fn handle(
    cluster: &Cluster,
    gateway: &Gateway,
    connection: &MultiplexedConnection,
    recent: &mut Recent,
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
            if instance == cluster.instance {
                cluster.replied(id, code, value);
            }
        }
        Some(Message::Request {
            origin,
            token,
            ask,
            rest,
        }) => {
            let rest = payload.slice_ref(rest);
            let (code, value) = gateway.apply_forwarded(token, ask, rest).await;
            reply(cluster, connection, origin, code, value);
        }
        Some(Message::Publish {
            origin,
            close,
            names,
            frame_at,
        }) => {
            // A publish to several channels arrives once per channel this node listens to.
            let first = !names.contains(&b'\n') || recent.first(origin);
            let delivered = if first {
                let frame = (frame_at < payload.len()).then(|| payload.slice(frame_at..));
                let names: Vec<&str> = message::names(names).collect();
                gateway.deliver_published(&names, frame, close).await
            } else {
                0
            };
            reply(
                cluster,
                connection,
                origin,
                Code::Delivered,
                delivered as u64,
            );
        }
    }
}

/// Answers `origin`: straight into its waiting request when it is this process, else through its
/// node's channel, without holding up the next message.
fn reply(
    cluster: &Cluster,
    connection: &MultiplexedConnection,
    origin: Origin,
    code: Code,
    value: u64,
) {
    if origin.instance == cluster.instance {
        cluster.replied(origin.id, code, value);
        return;
    }
    let body = message::reply(origin.instance, origin.id, code, value);
    let mut publish = redis::cmd("PUBLISH");
    publish.arg(node_channel(origin.node)).arg(&body[..]);
    let mut connection = connection.clone();
    tokio::spawn(async move {
        let sent: redis::RedisResult<usize> = publish.query_async(&mut connection).await;
        if let Err(err) = sent {
            log!(Level::Debug, "cluster: reply not sent: {err}");
        }
    });
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
