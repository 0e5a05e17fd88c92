//! `--cluster N`: one `redis-server` and N gateways pointed at it (`REDIS_URL`, PROTOCOL §10), all
//! on `--server-cpu`. `start` brings them up and waits until every node is ready and sees the others;
//! the scenarios then spread streams over the nodes (`stream::StreamConfig::targets`) and route
//! `/internal/*` requests with `--via` (`send::Router`). `scrape` reads a node's cluster metrics.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::gateway::Target;
use crate::redis::Redis;
use crate::send::Sender;

/// What `start` brought up.
pub struct Cluster {
    pub redis: Redis,
    pub nodes: Vec<Target>,
    /// Each node's `sse_gateway_cluster_nodes` once all agreed; `None` if the gateway exports no
    /// such series (a build without cluster support, which ignores `REDIS_URL`).
    pub nodes_seen: Option<Vec<f64>>,
    /// How long from the first spawn until every node was ready and saw N nodes.
    pub ready_after: Duration,
}

pub struct Spec<'a> {
    pub n: usize,
    pub gateway_bin: &'a str,
    pub redis_bin: &'a str,
    pub callback: SocketAddr,
    pub env: &'a [(String, String)],
    pub cpu: Option<usize>,
    pub log: Option<&'a str>,
    pub secret: Option<&'a str>,
    pub ready_timeout: Duration,
}

/// Starts Redis, then the N gateways with `REDIS_URL` (after `--gateway-env`, so it wins), then waits
/// for `/readyz` 200 on each and for each to count N nodes. On any error everything started so far
/// is killed (dropping a `Target` or `Redis` kills its process).
pub async fn start(spec: Spec<'_>) -> Result<Cluster, String> {
    let t0 = Instant::now();
    let redis = Redis::start(spec.redis_bin, spec.cpu).await?;
    let mut env = spec.env.to_vec();
    env.push(("REDIS_URL".to_owned(), redis.url()));
    let mut nodes = Vec::with_capacity(spec.n);
    for k in 0..spec.n {
        let log = spec.log.map(|p| format!("{p}.{k}"));
        let node = Target::spawn(
            spec.gateway_bin,
            spec.callback,
            &env,
            spec.cpu,
            log.as_deref(),
        )
        .await
        .map_err(|e| format!("node {k}: {e}"))?;
        nodes.push(node);
    }
    let deadline = t0 + spec.ready_timeout;
    // Every node ready (joined Redis).
    for (k, node) in nodes.iter().enumerate() {
        let mut s = Sender::new(node.internal, spec.secret);
        loop {
            let last = match s.get("/readyz").await {
                Ok((200, _)) => break,
                Ok((st, b)) => format!("status {st}: {}", String::from_utf8_lossy(&b)),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {k} not ready within {:?}: /readyz {last}",
                    spec.ready_timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Every node sees N nodes, when the gateway exports the count.
    let mut seen = Vec::with_capacity(spec.n);
    let mut supported = true;
    for (k, node) in nodes.iter().enumerate() {
        let mut s = Sender::new(node.internal, spec.secret);
        loop {
            let m = scrape(&mut s).await;
            let count = m
                .iter()
                .find(|(name, _)| name == "sse_gateway_cluster_nodes")
                .map(|&(_, v)| v);
            match count {
                None => {
                    supported = false;
                    break;
                }
                Some(c) if c as usize == spec.n => {
                    seen.push(c);
                    break;
                }
                Some(c) if Instant::now() >= deadline => {
                    return Err(format!(
                        "node {k} counts {c} cluster nodes, not {}, after {:?}",
                        spec.n, spec.ready_timeout
                    ));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        if !supported {
            break;
        }
    }
    Ok(Cluster {
        redis,
        nodes,
        nodes_seen: supported.then_some(seen),
        ready_after: t0.elapsed(),
    })
}

/// The `sse_gateway_cluster_*` and `sse_gateway_redis_up` series of one node's `/metrics`, as
/// (series with labels, value); empty when there are none or the request fails.
pub async fn scrape(s: &mut Sender) -> Vec<(String, f64)> {
    match s.get("/metrics").await {
        Ok((200, body)) => parse_cluster_series(&String::from_utf8_lossy(&body)),
        _ => Vec::new(),
    }
}

fn parse_cluster_series(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with("sse_gateway_cluster_") || l.starts_with("sse_gateway_redis_up"))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_series() {
        let text = "# HELP x\nsse_gateway_connections 3\nsse_gateway_cluster_nodes 3\n\
                    sse_gateway_redis_up 1\nsse_gateway_cluster_forwarded_total{kind=\"send\"} 12\n";
        assert_eq!(
            parse_cluster_series(text),
            [
                ("sse_gateway_cluster_nodes".to_owned(), 3.0),
                ("sse_gateway_redis_up".to_owned(), 1.0),
                (
                    "sse_gateway_cluster_forwarded_total{kind=\"send\"}".to_owned(),
                    12.0
                )
            ]
        );
    }
}
