//! Cluster: several gateways that act as one deployment, joined by Redis (PROTOCOL §10).
//!
//! Owns remote delivery: forwarding a token's request to the node that issued it, publishing to the
//! channels' members on every node, and this node's interest in channels. [`crate::gateway`] calls it
//! only for what is not local, so routes never know where a token lives, and with `REDIS_URL` unset
//! nothing here exists. It does not touch streams itself: what arrives for this node is applied
//! through the same `Gateway` operations a local request uses.
//!
//! How a request finds its node: a token names the node that issued it ([`crate::token`]), so a send
//! is one `PUBLISH` to that node's own Redis channel, and the number `PUBLISH` returns says at once
//! whether the node is listening at all (0: it is gone, the token is 404). The holder answers on the
//! asking node's channel. A publish goes to one Redis channel per listed channel, which a node listens
//! to only while it holds a member ([`link`]'s interest); every node that receives it answers with its
//! delivery count, the publishing node included (its own members get the frame through Redis like
//! everyone else's, so a publish that Redis did not take delivers nothing anywhere).
//!
//! Redis keys and channels, all under `sse-gateway:<db>:` (pub/sub ignores the database number, so
//! it is part of every name: deployments on one Redis in different databases stay apart):
//! `node:<n>` (a node's requests and replies), `channel:<name>` (a channel's publishes), `nodes` (a
//! sorted set of live nodes `<n>:<instance>:<client id>`, score = expiry), `claim:<n>` (who took
//! number `n`; taken atomically at start-up, so nodes that start together never share one).

mod history;
mod link;
pub mod message;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::metrics::ClusterGauges;
use crate::token::Token;
use crate::{log, log::Level};

pub use message::{Ask, Code};

/// Why a request that needs the cluster got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterError {
    /// Redis is unreachable (or this node has not joined yet): 503, nothing delivered.
    Unavailable,
    /// The holder did not answer within `CLUSTER_TIMEOUT_MS`: 504.
    Timeout,
}

/// A cluster-wide publish: deliveries counted by every node that answered in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub delivered: u64,
    /// False when some node that received the publish did not answer within `CLUSTER_TIMEOUT_MS`.
    pub complete: bool,
}

/// Kinds of forwarded requests, as `sse_gateway_cluster_forwarded_total{kind}` counts them.
#[derive(Clone, Copy)]
enum Forwarded {
    Send = 0,
    Publish = 1,
    Membership = 2,
}

pub struct Cluster {
    /// This node's number, in the top bits of every token it issues.
    pub node: u8,
    keys: Keys,
    /// Another live node has this node's number too (both chose it while Redis was unreachable):
    /// a token with this number that is not here may be the other's.
    shared: AtomicBool,
    /// Random per process: replies are matched to the process that asked.
    instance: u64,
    timeout: Duration,
    client: redis::Client,
    /// The link to Redis while joined; `None` while down.
    connection: Mutex<Option<MultiplexedConnection>>,
    up: AtomicBool,
    /// Requests waiting for replies, by id.
    waiting: Mutex<HashMap<u64, Arc<Waiting>>>,
    next_id: AtomicU64,
    /// This node's Redis connection id (`CLIENT ID`), named in the live set.
    client_id: AtomicU64,
    nodes: AtomicUsize,
    forwarded: [AtomicU64; 3],
    interest: link::Interest,
    /// `HISTORY_SIZE` and `HISTORY_TTL_SECONDS` for the history kept in Redis (PROTOCOL §11).
    history_size: usize,
    history_ttl: Duration,
}

/// The replies a request has received so far.
#[derive(Default)]
struct Waiting {
    tally: Mutex<Tally>,
    arrived: Notify,
}

#[derive(Default)]
struct Tally {
    replies: usize,
    delivered: u64,
    /// The first answer other than `NotFound` (a token has one holder).
    answer: Option<(Code, u64)>,
}

/// The names of this deployment's Redis keys and channels.
struct Keys {
    /// `sse-gateway:<db>:`
    prefix: String,
}

impl Keys {
    fn node_channel(&self, node: u8) -> String {
        format!("{}node:{node}", self.prefix)
    }

    fn channel(&self, name: &str) -> String {
        format!("{}channel:{name}", self.prefix)
    }

    fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    fn claim(&self, node: u8) -> String {
        format!("{}claim:{node}", self.prefix)
    }

    /// Outside `history:<name>` (no colon after `history`), so no channel's list can be it.
    fn history_clock(&self) -> String {
        format!("{}history-clock", self.prefix)
    }

    fn history(&self, name: &str) -> String {
        format!("{}history:{name}", self.prefix)
    }

    fn history_floor(&self, name: &str) -> String {
        format!("{}history-floor:{name}", self.prefix)
    }
}

impl Cluster {
    /// Connects once (within `CLUSTER_TIMEOUT_MS`) to choose a node number no live node holds; a
    /// node that cannot reach Redis now picks one at random and joins later. `Err`: the URL is not
    /// one the Redis client accepts.
    pub async fn new(url: &str, config: &Config) -> Result<Arc<Cluster>, String> {
        use redis::IntoConnectionInfo;
        let info = url
            .into_connection_info()
            .map_err(|err| format!("invalid REDIS_URL: {err}"))?;
        // RESP3: pub/sub pushes and ordinary commands share one connection.
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let keys = Keys {
            prefix: format!("sse-gateway:{}:", settings.db()),
        };
        let client = redis::Client::open(info.set_redis_settings(settings))
            .map_err(|err| format!("invalid REDIS_URL: {err}"))?;
        let mut random = [0u8; 9];
        getrandom::getrandom(&mut random).expect("the OS CSPRNG is available");
        let instance = u64::from_le_bytes(random[..8].try_into().expect("8 bytes"));
        let claim = link::claim_number(&client, &keys, instance, random[8]);
        let node = match tokio::time::timeout(config.cluster_timeout, claim).await {
            Ok(Ok(Some(node))) => node,
            Ok(Ok(None)) => {
                return Err(
                    "all 256 node numbers are taken: a deployment holds at most 256 gateways"
                        .into(),
                )
            }
            // Unreachable now: a number at random. A clash with another node that did the same
            // is seen at the heartbeat and handled (see `shared`).
            _ => random[8],
        };
        Ok(Arc::new(Cluster {
            node,
            keys,
            shared: AtomicBool::new(false),
            instance,
            timeout: config.cluster_timeout,
            client,
            connection: Mutex::new(None),
            up: AtomicBool::new(false),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            client_id: AtomicU64::new(0),
            nodes: AtomicUsize::new(0),
            forwarded: Default::default(),
            interest: link::Interest::default(),
            history_size: config.history_size,
            history_ttl: config.history_ttl,
        }))
    }

    /// Starts the link to Redis: joins, listens, and rejoins by itself after any failure.
    pub fn start(self: &Arc<Self>, gateway: Weak<Gateway>) {
        tokio::spawn(link::run(self.clone(), gateway));
    }

    /// Called by the channel registry when a channel's last local member left.
    pub fn channel_emptied(&self, name: Arc<str>) {
        self.interest.unwatch(name);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn is_local(&self, token: Token) -> bool {
        token.node() == self.node
    }

    /// Whether another live node has this node's number (see the field).
    pub fn is_shared(&self) -> bool {
        self.shared.load(Ordering::Relaxed)
    }

    pub fn gauges(&self) -> ClusterGauges {
        let forwarded = |kind: Forwarded| self.forwarded[kind as usize].load(Ordering::Relaxed);
        ClusterGauges {
            nodes: self.nodes.load(Ordering::Relaxed),
            redis_up: self.is_up(),
            forwarded: [
                ("send", forwarded(Forwarded::Send)),
                ("publish", forwarded(Forwarded::Publish)),
                ("membership", forwarded(Forwarded::Membership)),
            ],
        }
    }

    fn connection(&self) -> Result<MultiplexedConnection, ClusterError> {
        self.connection
            .lock()
            .clone()
            .ok_or(ClusterError::Unavailable)
    }

    /// Registers a request that will wait for replies; the guard unregisters it.
    fn expect_replies(&self) -> (u64, Arc<Waiting>, Unregister<'_>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waiting = Arc::new(Waiting::default());
        self.waiting.lock().insert(id, waiting.clone());
        (id, waiting, Unregister { cluster: self, id })
    }

    /// This process as the origin of request `id`, waiting `CLUSTER_TIMEOUT_MS` from now.
    fn origin(&self, id: u64) -> message::Origin {
        message::Origin {
            instance: self.instance,
            node: self.node,
            id,
            expires_ms: link::now_ms() + self.timeout.as_millis() as u64,
        }
    }

    /// Forwards `ask` for `token` to the node that issued it and returns that node's answer.
    /// `rest` is the send's frame or the membership's channel names.
    pub async fn ask(
        &self,
        token: Token,
        ask: Ask,
        rest: &[&[u8]],
    ) -> Result<(Code, u64), ClusterError> {
        let kind = match ask {
            Ask::Send { .. } => Forwarded::Send,
            Ask::Subscribe | Ask::Unsubscribe => Forwarded::Membership,
        };
        let mut connection = self.connection()?;
        let deadline = Instant::now() + self.timeout;
        let (id, waiting, _unregister) = self.expect_replies();
        let request = message::request(self.origin(id), token, ask, rest);
        let mut publish = redis::cmd("PUBLISH");
        publish
            .arg(self.keys.node_channel(token.node()))
            .arg(&request[..]);
        let listeners: usize = self
            .bounded(deadline, publish.query_async(&mut connection))
            .await?;
        self.forwarded[kind as usize].fetch_add(1, Ordering::Relaxed);
        if listeners == 0 {
            // No node listens under that number: whoever issued the token is gone.
            return Ok((Code::NotFound, 0));
        }
        let done = |tally: &Tally| tally.answer.is_some() || tally.replies >= listeners;
        if !waiting.wait(deadline, done).await {
            return Err(ClusterError::Timeout);
        }
        let tally = waiting.tally.lock();
        Ok(tally.answer.unwrap_or((Code::NotFound, 0)))
    }

    /// Publishes `frame` to the members of any of `names` on every node, this one included, and
    /// counts the deliveries that the nodes report within `CLUSTER_TIMEOUT_MS`. `recorded`: with
    /// history, Redis gives the frame its position and keeps it in each channel, in the same step.
    pub async fn publish(
        &self,
        names: &[&str],
        frame: Option<&Bytes>,
        close: bool,
        recorded: bool,
    ) -> Result<Published, ClusterError> {
        let mut connection = self.connection()?;
        let deadline = Instant::now() + self.timeout;
        let (id, waiting, _unregister) = self.expect_replies();
        let receivers: Vec<usize> = match frame {
            Some(frame) if recorded => {
                let mut names = names.to_vec();
                names.sort_unstable();
                names.dedup();
                let head = message::publish(self.origin(id), close, &names, None);
                let mut script = history::PUBLISH.prepare_invoke();
                self.history_keys(&mut script, &names);
                script
                    .arg(self.epoch_candidate())
                    .arg(self.history_size)
                    .arg(self.history_ttl.as_millis() as u64)
                    .arg(&head[..])
                    .arg(&frame[..]);
                for name in &names {
                    script.arg(self.keys.channel(name));
                }
                self.bounded(deadline, script.invoke_async(&mut connection))
                    .await?
            }
            _ => {
                let body = message::publish(self.origin(id), close, names, frame);
                let mut pipeline = redis::pipe();
                for name in names {
                    pipeline
                        .cmd("PUBLISH")
                        .arg(self.keys.channel(name))
                        .arg(&body[..]);
                }
                self.bounded(deadline, pipeline.query_async(&mut connection))
                    .await?
            }
        };
        self.forwarded[Forwarded::Publish as usize].fetch_add(1, Ordering::Relaxed);
        let expected: usize = receivers.iter().sum();
        let complete = waiting
            .wait(deadline, |tally| tally.replies >= expected)
            .await;
        let delivered = waiting.tally.lock().delivered;
        Ok(Published {
            delivered,
            complete,
        })
    }

    /// What Redis keeps of `names` after position `after` (PROTOCOL §11), read in one step.
    pub async fn history(
        &self,
        names: &[&str],
        after: u64,
    ) -> Result<(crate::history::Now, Vec<crate::history::Kept>), ClusterError> {
        let mut connection = self.connection()?;
        let deadline = Instant::now() + self.timeout;
        let mut script = history::READ.prepare_invoke();
        self.history_keys(&mut script, names);
        script.arg(after).arg(self.epoch_candidate());
        let answer: Vec<redis::Value> = self
            .bounded(deadline, script.invoke_async(&mut connection))
            .await?;
        history::snapshot(answer).ok_or_else(|| {
            log!(
                Level::Warn,
                "cluster: history read answered in an unknown shape"
            );
            ClusterError::Unavailable
        })
    }

    /// An epoch to propose if the deployment's history has none yet (Redis started empty): fresh
    /// each time, so that a Redis that lost its data never gets the epoch of its earlier life back.
    fn epoch_candidate(&self) -> String {
        let mut epoch = [0u8; 4];
        getrandom::getrandom(&mut epoch).expect("the OS CSPRNG is available");
        format!("{:08x}", u32::from_le_bytes(epoch))
    }

    /// The keys both history scripts take: the clock, each channel's list, each one's floor.
    fn history_keys(&self, script: &mut redis::ScriptInvocation<'_>, names: &[&str]) {
        script.key(self.keys.history_clock());
        for name in names {
            script.key(self.keys.history(name));
        }
        for name in names {
            script.key(self.keys.history_floor(name));
        }
    }

    /// Awaits a command on the link; any failure, or no answer by `deadline`, is `Unavailable`
    /// (the link notices a dead connection by itself and rejoins).
    async fn bounded<T>(
        &self,
        deadline: Instant,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout_at(deadline.into(), command).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                log!(Level::Debug, "cluster: Redis command failed: {err}");
                Err(ClusterError::Unavailable)
            }
            Err(_) => Err(ClusterError::Unavailable),
        }
    }

    /// A reply for this process: counts it towards its waiting request.
    fn replied(&self, id: u64, code: Code, value: u64) {
        let Some(waiting) = self.waiting.lock().get(&id).cloned() else {
            // Answered after its request stopped waiting (timeout): nothing to do.
            return;
        };
        {
            let mut tally = waiting.tally.lock();
            tally.replies += 1;
            match code {
                Code::Delivered => tally.delivered += value,
                Code::NotFound => {}
                other => {
                    tally.answer.get_or_insert((other, value));
                }
            }
        }
        waiting.arrived.notify_one();
    }

    fn set_down(&self, why: &str) {
        *self.connection.lock() = None;
        if self.up.swap(false, Ordering::AcqRel) {
            log!(Level::Warn, "cluster: left Redis ({why}); rejoining");
        }
        // Requests waiting on replies that may never come: let them run out their deadline
        // rather than guess; a publish then answers what it has with `complete:false`.
    }
}

struct Unregister<'c> {
    cluster: &'c Cluster,
    id: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.cluster.waiting.lock().remove(&self.id);
    }
}

impl Waiting {
    /// Waits until `done` holds for the replies so far, or `deadline`; true if `done` held.
    async fn wait(&self, deadline: Instant, done: impl Fn(&Tally) -> bool) -> bool {
        let deadline = tokio::time::Instant::from_std(deadline);
        loop {
            let arrived = self.arrived.notified();
            if done(&self.tally.lock()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return done(&self.tally.lock());
            }
        }
    }
}
