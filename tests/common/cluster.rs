//! N gateway processes joined by one real Redis (PROTOCOL §10), one backend double for all of
//! them, and the helpers the cluster tests share: readiness, sequence-numbered events, draining a
//! stream to check that nothing arrived twice.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::http::{self, HttpConn, NoItem, Response, SseStream};
use super::sse::Item;
use super::{Backend, Gateway, GatewayBuilder, Metrics, Redis, Reply};

/// How long a fresh cluster may take until every node sees every other.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

pub const NODES: &str = "sse_gateway_cluster_nodes";
pub const REDIS_UP: &str = "sse_gateway_redis_up";
pub const FORWARDED: &str = "sse_gateway_cluster_forwarded_total";

pub struct Cluster {
    pub redis: Redis,
    pub backend: Backend,
    /// The nodes, A, B, C, ... in start order.
    pub nodes: Vec<Gateway>,
}

impl Cluster {
    /// Redis, the backend double and `n` gateways with `REDIS_URL` (each builder passed through
    /// `configure` for extra settings); returns once every node is ready and counts `n` nodes.
    pub async fn start(n: usize, configure: impl Fn(GatewayBuilder) -> GatewayBuilder) -> Cluster {
        Cluster::start_on("", n, configure).await
    }

    /// As [`Cluster::start`], with every node's `REDIS_URL` naming Redis database `db`
    /// (`redis://127.0.0.1:<port>/<db>`).
    pub async fn start_in_db(
        db: u32,
        n: usize,
        configure: impl Fn(GatewayBuilder) -> GatewayBuilder,
    ) -> Cluster {
        Cluster::start_on(&format!("/{db}"), n, configure).await
    }

    /// [`Cluster::start`] with `path` after the Redis URL's address.
    async fn start_on(
        path: &str,
        n: usize,
        configure: impl Fn(GatewayBuilder) -> GatewayBuilder,
    ) -> Cluster {
        let redis = Redis::start().await;
        let backend = Backend::start().await;
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            let builder = Gateway::builder()
                .callback(&backend)
                .env("REDIS_URL", format!("{}{path}", redis.url()));
            nodes.push(configure(builder).spawn().await);
        }
        let cluster = Cluster {
            redis,
            backend,
            nodes,
        };
        cluster.wait_joined(n, JOIN_TIMEOUT).await;
        cluster
    }

    /// Waits until every running node answers `/readyz` 200 `{..., "redis": true}` and counts
    /// `n` nodes in `sse_gateway_cluster_nodes`.
    pub async fn wait_joined(&self, n: usize, within: Duration) {
        wait_joined(&self.nodes, n, within).await;
    }

    /// Sets the backend's connect answer to put new streams in `channels`.
    pub fn join_on_connect(&self, channels: &[&str]) {
        self.backend
            .on_connect(Reply::ok().body(json!({ "channels": channels }).to_string()));
    }

    /// Opens a stream on node `i` in `channels`; returns it with its token.
    pub async fn open_in(
        &mut self,
        i: usize,
        target: &str,
        channels: &[&str],
    ) -> (SseStream, String) {
        self.join_on_connect(channels);
        self.nodes[i].open(&mut self.backend, target).await
    }

    /// The sum over the nodes of `sse_gateway_cluster_forwarded_total{kind}`.
    pub async fn forwarded(&self, kind: &str) -> f64 {
        let mut total = 0.0;
        for gw in &self.nodes {
            total += gw.metrics().await.value(FORWARDED, &[("kind", kind)]);
        }
        total
    }
}

/// Waits until each of `nodes` answers `/readyz` 200 `{..., "redis": true}` and counts `n` nodes
/// in `sse_gateway_cluster_nodes`.
pub async fn wait_joined(nodes: &[Gateway], n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    for (i, gw) in nodes.iter().enumerate() {
        loop {
            let ready = readyz(gw).await;
            let m = gw.metrics().await;
            if ready.status() == 200 && m.get(NODES, &[]) == Some(n as f64) {
                ready.assert_json(200, ready_body());
                break;
            }
            if Instant::now() > deadline {
                let cluster_lines: Vec<&str> = m
                    .text
                    .lines()
                    .filter(|l| {
                        !l.starts_with('#') && (l.contains("cluster") || l.contains("redis"))
                    })
                    .collect();
                panic!(
                    "node {i} ({}) did not join a cluster of {n} within {within:?}: /readyz {} {}; \
                     cluster metrics {cluster_lines:#?}",
                    gw.addr,
                    ready.status(),
                    ready.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `GET /readyz` on the public listener.
pub async fn readyz(gw: &Gateway) -> Response {
    http::get(gw.addr, "/readyz").await
}

/// Polls `/readyz` until it is 200 with `redis: true`; panics with the last answer after `within`.
pub async fn wait_ready(gw: &Gateway, within: Duration) -> Duration {
    wait_readyz(gw, within, 200).await
}

/// Polls `/readyz` (every 20 ms) until its status is `status`; returns how long that took.
pub async fn wait_readyz(gw: &Gateway, within: Duration, status: u16) -> Duration {
    let start = Instant::now();
    let deadline = start + within;
    loop {
        let r = readyz(gw).await;
        if r.status() == status {
            return start.elapsed();
        }
        if Instant::now() > deadline {
            panic!(
                "/readyz of {} not {status} within {within:?}: {} {}",
                gw.addr,
                r.status(),
                r.text()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn ready_body() -> Value {
    json!({"status": "ready", "configured": true, "redis": true})
}

pub fn not_ready_body() -> Value {
    json!({"status": "not_ready", "configured": true, "redis": false})
}

pub fn unavailable() -> Value {
    json!({"error": "Cluster unavailable"})
}

pub fn not_found() -> Value {
    json!({"error": "Token not found"})
}

/// The data of a sequence-numbered event: `<label>#<seq>`.
pub fn seq_data(label: &str, seq: u64) -> String {
    format!("{label}#{seq}")
}

/// Parses `<label>#<seq>`.
pub fn parse_seq(data: &str) -> Option<(&str, u64)> {
    let (label, seq) = data.rsplit_once('#')?;
    Some((label, seq.parse().ok()?))
}

/// Reads a stream until it has been quiet (no event; heartbeats don't count) for `quiet`;
/// returns the event data in arrival order and how many comments (heartbeats) came.
pub async fn drain(stream: &mut SseStream, quiet: Duration) -> (Vec<String>, usize) {
    let mut events = Vec::new();
    let mut comments = 0;
    let mut last_event = Instant::now();
    loop {
        let left = (last_event + quiet).saturating_duration_since(Instant::now());
        match stream.next_item(left).await {
            Ok(Item::Event(e)) => {
                events.push(e.data);
                last_event = Instant::now();
            }
            Ok(Item::Comment(_)) => comments += 1,
            Err(NoItem::Timeout) => return (events, comments),
            Err(NoItem::Ended(end)) => panic!(
                "stream ended ({end:?}) while draining; events so far {events:?}; payload {:?}",
                String::from_utf8_lossy(&stream.payload)
            ),
        }
    }
}

/// Reads a stream for `quiet` and asserts no event came (heartbeats may); returns how many
/// heartbeats came.
#[track_caller]
pub fn expect_no_event(
    stream: &mut SseStream,
    quiet: Duration,
) -> impl std::future::Future<Output = usize> + '_ {
    let caller = std::panic::Location::caller();
    async move {
        let deadline = Instant::now() + quiet;
        let mut comments = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stream.next_item(left).await {
                Ok(Item::Comment(_)) => comments += 1,
                Ok(Item::Event(e)) => panic!("{caller}: expected no event, got {e:?}"),
                Err(NoItem::Timeout) => return comments,
                Err(NoItem::Ended(end)) => panic!("{caller}: stream ended ({end:?})"),
            }
        }
    }
}

/// Counts how often each data string occurs.
pub fn counts(events: &[String]) -> BTreeMap<&str, usize> {
    let mut out = BTreeMap::new();
    for e in events {
        *out.entry(e.as_str()).or_insert(0) += 1;
    }
    out
}

/// Publishes and returns the answer (any status).
pub async fn publish(gw: &Gateway, body: &Value) -> Response {
    gw.post("/internal/publish", body).await
}

/// Publishes, asserts exactly `{"status":"ok","delivered":N}` (a complete publish), returns N.
#[track_caller]
pub fn publish_ok<'a>(
    gw: &'a Gateway,
    body: &'a Value,
) -> impl std::future::Future<Output = u64> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let r = publish(gw, body).await;
        assert_eq!(r.status(), 200, "{caller}: publish {body}: {}", r.text());
        let answer = r.json();
        let delivered = answer["delivered"]
            .as_u64()
            .unwrap_or_else(|| panic!("{caller}: delivered is a count: {answer}"));
        assert_eq!(
            answer,
            json!({"status": "ok", "delivered": delivered}),
            "{caller}: a complete publish answers exactly as one node"
        );
        delivered
    }
}

/// Many `/internal/send` requests on one keep-alive connection.
pub struct Sender {
    conn: HttpConn,
}

impl Sender {
    pub async fn connect(gw: &Gateway) -> Sender {
        Sender {
            conn: HttpConn::connect(gw.control_addr()).await,
        }
    }

    pub async fn post(&mut self, path: &str, body: &Value) -> Response {
        self.conn.post_json(path, body).await
    }
}

/// Metrics of every node, for failure messages.
pub async fn scrape_all(nodes: &[Gateway]) -> Vec<Metrics> {
    let mut out = Vec::new();
    for gw in nodes {
        out.push(gw.metrics().await);
    }
    out
}
