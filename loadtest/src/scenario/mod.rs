//! The scenarios and what they share: a `Ctx` holding the target, the backend double, the stream
//! sink and the report, built once by `run`, which also tears everything down within deadlines.

mod broadcast;
mod connect_rate;
mod density;
mod history_memory;
mod hold;
mod idle;
mod resume;
mod soak;
mod unicast;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;

use crate::backend::Backend;
use crate::cli::{Cli, Common, Scenario};
use crate::cluster;
use crate::gateway::Target;
use crate::redis::Redis;
use crate::report::{Report, EXIT_USAGE};
use crate::send::{Router, Sender};
use crate::stream::{Pool, Sink, StreamConfig};
use crate::sys::{CpuMeter, FD_RESERVE};

/// Time a spawned gateway gets to drain after SIGTERM before it is killed.
const GATEWAY_STOP_GRACE: Duration = Duration::from_secs(20);

pub struct Ctx {
    pub common: Common,
    /// The gateways: one, or the N nodes of `--cluster N` (node k at index k).
    pub nodes: Vec<Target>,
    /// The Redis server of `--cluster`.
    pub redis: Option<Redis>,
    pub backend: Arc<Backend>,
    pub sink: Arc<Sink>,
    pub report: Report,
    /// Streams this process can hold: the fd limit less `FD_RESERVE`.
    pub max_streams: usize,
}

impl Ctx {
    pub fn pool(&self) -> Pool {
        self.pool_with(false, self.common.open_concurrency)
    }

    /// A pool whose streams keep their last event id (`track_ids`), with `concurrency` opens in
    /// flight at once.
    pub fn pool_with(&self, track_ids: bool, concurrency: usize) -> Pool {
        Pool::new(
            self.sink.clone(),
            self.backend.clone(),
            StreamConfig {
                targets: self.publics(),
                path: self.common.path.clone(),
                sources: self.common.sources,
                head_timeout: Duration::from_secs(self.common.head_timeout),
                track_ids,
            },
            concurrency,
        )
    }

    /// Node 0's metric series (`GET /metrics` on its internal listener) named `name` exactly or
    /// `name{...}`, as (series, value); `None` when the metrics cannot be read.
    pub async fn metric(&self, name: &str) -> Option<Vec<(String, f64)>> {
        match self.sender_to(0).get("/metrics").await {
            Ok((200, body)) => Some(series(&String::from_utf8_lossy(&body), name)),
            _ => None,
        }
    }

    /// The value of node 0's series `series` (e.g. `sse_gateway_history_bytes` or
    /// `sse_gateway_resumes_total{result="gap"}`); `None` if absent or unreadable.
    pub async fn metric_value(&self, series: &str) -> Option<f64> {
        let name = series.split('{').next().unwrap_or(series);
        self.metric(name)
            .await?
            .into_iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| v)
    }

    /// A `--gateway-env` value (the spawned gateway's setting), parsed.
    pub fn env_value<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.common
            .gateway_env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse().ok())
    }

    /// The nodes' public listeners, in node order.
    pub fn publics(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|t| t.public).collect()
    }

    /// A sender to node `k`'s internal listener.
    pub fn sender_to(&self, k: usize) -> Sender {
        let s = Sender::new(
            self.nodes[k].internal,
            self.common.internal_secret.as_deref(),
        );
        if self.common.target == crate::cli::TargetKind::Nchan {
            s.nchan()
        } else {
            s
        }
    }

    /// A sender to the node requests that name no token go to (`--via`'s node, else node 0).
    pub fn sender(&self) -> Sender {
        self.sender_to(self.common.via.home())
    }

    /// One sender per node, routed by `--via`.
    pub fn router(&self) -> Router {
        Router::new(
            (0..self.nodes.len()).map(|k| self.sender_to(k)).collect(),
            self.common.via,
        )
    }

    /// Every measured process: the gateways (`gateway`, or `node K` in a cluster) and Redis.
    pub fn procs(&self) -> Vec<(String, u32)> {
        let cluster = self.common.cluster.is_some();
        let mut v: Vec<(String, u32)> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(k, t)| {
                let label = if cluster {
                    format!("node {k}")
                } else {
                    "gateway".to_owned()
                };
                t.pid.map(|p| (label, p))
            })
            .collect();
        if let Some(pid) = self.redis.as_ref().and_then(|r| r.pid) {
            v.push(("redis".to_owned(), pid));
        }
        v
    }

    /// The gateways' pids, or `None` unless every one is known.
    pub fn gateway_pids(&self) -> Option<Vec<u32>> {
        self.nodes.iter().map(|t| t.pid).collect()
    }

    /// CPU of every gateway plus Redis from now on.
    pub fn cpu(&self) -> CpuMeter {
        CpuMeter::start(self.procs())
    }

    /// `cpu_s` split by process, for the report: `node 0 1.20 s, node 1 0.80 s, redis 0.30 s`
    /// (one gateway and no Redis: nothing).
    pub fn cpu_breakdown(&mut self, cpu: &CpuMeter, key: &str) {
        if cpu.len() < 2 {
            return;
        }
        let each = cpu.each();
        self.report.line(format!(
            "  CPU by process: {}",
            each.iter()
                .map(|(l, s)| format!("{l} {s:.2} s"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        self.report.set(
            key,
            each.into_iter()
                .map(|(l, s)| (l, json!(crate::report::round(s, 3))))
                .collect::<serde_json::Map<_, _>>(),
        );
    }

    /// Redis's command counters now (`None` without `--cluster`).
    pub async fn redis_stats(&self) -> Option<crate::redis::Stats> {
        self.redis.as_ref()?.stats().await
    }

    /// Reports what Redis did since `before` (per `per` events when given): calls per command and
    /// bytes in and out.
    pub async fn redis_report(&mut self, before: Option<crate::redis::Stats>, per: u64) {
        let (Some(before), Some(now)) = (before, self.redis_stats().await) else {
            return;
        };
        let d = now.since(&before);
        let per_f = per.max(1) as f64;
        self.report.line(format!(
            "  redis: {} commands ({:.2} per event: {}), {} in / {} out ({:.0} / {:.0} B per event)",
            d.total_calls(),
            d.total_calls() as f64 / per_f,
            d.calls
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            crate::report::mib(d.net_in),
            crate::report::mib(d.net_out),
            d.net_in as f64 / per_f,
            d.net_out as f64 / per_f,
        ));
        self.report.set(
            "redis",
            json!({"calls": d.calls, "net_in_bytes": d.net_in, "net_out_bytes": d.net_out,
                   "calls_per_event": crate::report::round(d.total_calls() as f64 / per_f, 3),
                   "events": per}),
        );
    }

    /// `n`, or the most streams this process can hold, saying so when it caps.
    pub fn cap(&mut self, n: usize) -> usize {
        if n > self.max_streams {
            self.report.line(format!(
                "NOTE: {n} streams capped to {} (open-file limit less {FD_RESERVE} reserved descriptors)",
                self.max_streams
            ));
            self.report.set("capped_to", self.max_streams);
            self.max_streams
        } else {
            n
        }
    }

    pub fn open_timeout(&self) -> Duration {
        Duration::from_secs(self.common.open_timeout)
    }

    /// Opens `n` streams (one phase, with its deadline) and reports the outcome; returns the pool.
    pub async fn open_streams(&mut self, n: usize) -> Pool {
        let n = self.cap(n);
        let mut pool = self.pool();
        let r = pool.grow(n, self.open_timeout()).await;
        self.report.line(format!(
            "opened {} of {n} streams in {:.2} s ({:.0}/s), {} failed, {} pending",
            r.established,
            r.elapsed.as_secs_f64(),
            r.established as f64 / r.elapsed.as_secs_f64().max(1e-9),
            r.failed,
            r.pending
        ));
        self.report.set(
            "open",
            json!({"target": n, "established": r.established, "failed": r.failed, "pending": r.pending,
                   "seconds": crate::report::round(r.elapsed.as_secs_f64(), 3)}),
        );
        if r.deadline_missed {
            self.report.missed(format!(
                "{} of {n} streams still without headers after {} s",
                r.pending, self.common.open_timeout
            ));
        }
        if r.failed > 0 {
            self.report
                .fail(format!("{} of {n} stream opens failed", r.failed));
        }
        pool
    }

    /// Closes every stream and checks that each accepted token got exactly one disconnect callback.
    pub async fn close_and_audit(&mut self, mut pool: Pool) {
        pool.close_all();
        drop(pool);
        let (audit, done) = self
            .backend
            .wait_disconnects(Duration::from_secs(self.common.drain_timeout))
            .await;
        self.report
            .line(format!("disconnect callbacks: {}", audit.human()));
        self.report.set("disconnect_audit", audit.json());
        if !done {
            self.report.missed(format!(
                "{} tokens still without a disconnect callback {} s after closing",
                audit.without_disconnect, self.common.drain_timeout
            ));
        }
        if audit.duplicate_disconnects > 0 || audit.unknown_disconnects > 0 {
            self.report.fail(format!(
                "disconnect callbacks not exactly once: {} duplicates, {} for unknown tokens",
                audit.duplicate_disconnects, audit.unknown_disconnects
            ));
        }
    }

    /// Fails the run when a spawned gateway (or the cluster's Redis) died.
    pub fn check_alive(&mut self) -> bool {
        let mut alive = true;
        for k in 0..self.nodes.len() {
            if let Some(st) = self.nodes[k].exited() {
                let who = self.node_name(k);
                self.report
                    .fail(format!("{who} exited during the run: {st}"));
                alive = false;
            }
        }
        if let Some(st) = self.redis.as_mut().and_then(|r| r.exited()) {
            self.report
                .fail(format!("redis-server exited during the run: {st}"));
            alive = false;
        }
        alive
    }

    /// `the gateway`, or `node K` in a cluster.
    pub fn node_name(&self, k: usize) -> String {
        if self.common.cluster.is_some() {
            format!("node {k}")
        } else {
            "the gateway".to_owned()
        }
    }

    /// The gateways' `sse_gateway_cluster_*` and `sse_gateway_redis_up` series (GET /metrics on
    /// each node's internal listener), into the report; nothing without `--cluster`.
    pub async fn cluster_metrics(&mut self) {
        if self.common.cluster.is_none() {
            return;
        }
        let mut all = serde_json::Map::new();
        for k in 0..self.nodes.len() {
            let m = cluster::scrape(&mut self.sender_to(k)).await;
            let shown: Vec<String> = m.iter().map(|(n, v)| format!("{n} {v}")).collect();
            self.report.line(format!(
                "  node {k} metrics: {}",
                if shown.is_empty() {
                    "no sse_gateway_cluster_* series".to_owned()
                } else {
                    shown.join(", ")
                }
            ));
            all.insert(
                format!("node{k}"),
                m.into_iter().map(|(n, v)| (n, json!(v))).collect(),
            );
        }
        self.report.set("cluster_metrics", all);
    }
}

/// The lines of a Prometheus text `text` for metric `name` (exactly, or with labels).
fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            Some((s.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

pub async fn run(cli: Cli, nofile: u64) -> u8 {
    let common = cli.common.clone();
    let mut report = Report::default();
    report.set("scenario", cli.scenario.name());
    let channel = match &cli.scenario {
        Scenario::Broadcast {
            publish: true,
            channel,
            ..
        } => Some(channel.as_str()),
        _ => common.join_channel.as_deref(),
    };
    let backend = match &cli.scenario {
        Scenario::Soak {
            backend_delay_ms: (min, max),
            ..
        } => Backend::slow(
            channel,
            Duration::from_millis(*min),
            Duration::from_millis(*max),
        ),
        Scenario::Resume { channels, join, .. } => {
            Backend::new(None, Duration::from_millis(common.callback_delay_ms)).with_plan(
                crate::backend::Plan {
                    prefix: "h".to_owned(),
                    count: *channels,
                    all: *join == crate::cli::Join::All,
                },
            )
        }
        _ => Backend::new(channel, Duration::from_millis(common.callback_delay_ms)),
    };
    let attached = common.gateway_bin.is_none();
    let cb_addr = match (common.callback_listen, attached) {
        (Some(a), _) => a,
        (None, false) => SocketAddr::from(([127, 0, 0, 1], 0)),
        (None, true) => {
            eprintln!("sse-load: attaching with --url needs --callback-listen ADDR (the gateway's CALLBACK_URL points there)");
            return EXIT_USAGE;
        }
    };
    if let Err(e) = crate::gateway::check_loopback(cb_addr) {
        eprintln!("sse-load: --callback-listen {e}");
        return EXIT_USAGE;
    }
    let listener = match TcpListener::bind(cb_addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sse-load: bind callback server on {cb_addr}: {e}");
            return EXIT_USAGE;
        }
    };
    let cb_addr = listener
        .local_addr()
        .expect("bound listener has an address");
    backend.start(listener);
    let mut redis = None;
    let nodes = match (&common.gateway_bin, &common.url, common.cluster) {
        (Some(bin), None, Some(n)) => {
            let spec = crate::cluster::Spec {
                n: n as usize,
                gateway_bin: bin,
                redis_bin: &common.redis_bin,
                callback: cb_addr,
                env: &common.gateway_env,
                cpu: common.server_cpu,
                log: common.gateway_log.as_deref(),
                secret: common.internal_secret.as_deref(),
                ready_timeout: Duration::from_secs(common.cluster_timeout),
            };
            // Ctrl-C while the nodes start: everything started so far is dropped, so killed.
            let started = tokio::select! {
                r = crate::cluster::start(spec) => r,
                s = interrupted() => Err(format!("{s} while starting the cluster")),
            };
            started.map(|c| {
                match &c.nodes_seen {
                    Some(seen) => println!(
                        "cluster: redis-server {} (pid {}), {} gateways ready, each counting {:?} nodes, after {:.2} s",
                        c.redis.addr,
                        c.redis.pid.unwrap_or(0),
                        c.nodes.len(),
                        seen,
                        c.ready_after.as_secs_f64()
                    ),
                    None => println!(
                        "NOTE: cluster: the gateways export no sse_gateway_cluster_nodes: this build has no \
                         cluster support (REDIS_URL ignored?); cross-node requests will fail"
                    ),
                }
                report.set(
                    "cluster",
                    json!({"nodes": c.nodes.len(), "redis": c.redis.addr.to_string(),
                           "redis_pid": c.redis.pid, "via": format!("{:?}", common.via),
                           "nodes_seen": c.nodes_seen, "supported": c.nodes_seen.is_some(),
                           "ready_seconds": crate::report::round(c.ready_after.as_secs_f64(), 3)}),
                );
                redis = Some(c.redis);
                c.nodes
            })
        }
        (Some(bin), None, None) => Target::spawn(
            bin,
            cb_addr,
            &common.gateway_env,
            common.server_cpu,
            common.gateway_log.as_deref(),
        )
        .await
        .map(|t| vec![t]),
        (None, Some(_), Some(_)) => {
            Err("--cluster needs --gateway-bin (it starts the nodes)".to_owned())
        }
        (None, Some(url), None) => {
            Target::attach(url, common.internal_url.as_deref(), common.pid).map(|t| vec![t])
        }
        _ => Err("give exactly one of --gateway-bin PATH or --url URL".to_owned()),
    };
    let nodes = match nodes {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sse-load: {e}");
            return EXIT_USAGE;
        }
    };
    match common.via {
        crate::send::Via::Node(k) if k >= nodes.len() => {
            eprintln!(
                "sse-load: --via {k}: there are {} nodes (0..{})",
                nodes.len(),
                nodes.len() - 1
            );
            return EXIT_USAGE;
        }
        crate::send::Via::Other if nodes.len() < 2 => {
            eprintln!("sse-load: --via other needs --cluster 2 or more");
            return EXIT_USAGE;
        }
        _ => {}
    }
    let max_streams = nofile.saturating_sub(FD_RESERVE) as usize;
    for (k, target) in nodes.iter().enumerate() {
        println!(
            "sse-load {}: {} public {} internal {} pid {} ({}); callback server http://{cb_addr}/callback; \
             open-file limit {nofile} -> at most {max_streams} streams; load cpu {:?}, server cpu {:?}",
            cli.scenario.name(),
            if common.cluster.is_some() { format!("node {k}") } else { "gateway".to_owned() },
            target.public,
            target.internal,
            target.pid.map_or("unknown (no --pid: no memory/CPU figures)".to_owned(), |p| p.to_string()),
            if attached { "attached" } else { "spawned" },
            common.load_cpu,
            common.server_cpu,
        );
    }
    let gw_json: Vec<_> = nodes
        .iter()
        .map(|t| {
            json!({"public": t.public.to_string(), "internal": t.internal.to_string(),
                   "pid": t.pid, "spawned": !attached})
        })
        .collect();
    report.set(
        "gateway",
        if gw_json.len() == 1 {
            gw_json[0].clone()
        } else {
            json!(gw_json)
        },
    );
    report.set("callback", cb_addr.to_string());
    let sink = Arc::new(Sink::default());
    let mut ctx = Ctx {
        common,
        nodes,
        redis,
        backend,
        sink,
        report,
        max_streams,
    };
    // SIGINT/SIGTERM end the scenario early, and the gateways and Redis are still stopped in order
    // by `finish` (`hold` handles the signals itself and then finishes normally).
    let is_hold = matches!(cli.scenario, Scenario::Hold { .. });
    let cut_short = {
        let work = dispatch(&mut ctx, cli.scenario);
        if is_hold {
            work.await;
            None
        } else {
            tokio::select! {
                () = work => None,
                s = interrupted() => Some(s),
            }
        }
    };
    if let Some(sig) = cut_short {
        ctx.report.missed(format!(
            "{sig}: the run was cut short; stopping everything it started"
        ));
    }
    finish(ctx).await
}

async fn dispatch(ctx: &mut Ctx, scenario: Scenario) {
    match scenario {
        Scenario::Density { steps, settle } => density::run(ctx, &steps, settle).await,
        Scenario::Unicast {
            streams,
            concurrency,
            duration,
            rate,
            count,
            payload_bytes,
            batch,
        } => {
            let o = unicast::Opts {
                streams,
                concurrency,
                duration,
                rate,
                count,
                payload_bytes,
                batch: batch as usize,
            };
            unicast::run(ctx, o).await
        }
        Scenario::Broadcast {
            streams,
            rounds,
            concurrency,
            publish,
            channel,
            interval_ms,
            round_timeout,
            pipeline,
            probe_rate,
        } => {
            let o = broadcast::Opts {
                streams,
                rounds,
                concurrency,
                publish,
                channel,
                interval: Duration::from_millis(interval_ms),
                round_timeout: Duration::from_secs(round_timeout),
                pipeline,
                probe_rate,
            };
            broadcast::run(ctx, o).await
        }
        Scenario::ConnectRate {
            concurrency,
            duration,
            count,
            abandon_ms,
        } => connect_rate::run(ctx, concurrency, duration, count, abandon_ms).await,
        Scenario::Idle {
            streams,
            duration,
            heartbeat,
        } => idle::run(ctx, streams, duration, heartbeat).await,
        Scenario::Hold {
            streams,
            control,
            duration,
        } => hold::run(ctx, streams, control, duration).await,
        Scenario::Resume {
            streams,
            channels,
            join,
            before,
            missed,
            spread_ms,
            reconnect_concurrency,
            without_id,
            publish_during_ms,
            storm_timeout,
        } => {
            let o = resume::Opts {
                streams,
                plan: crate::backend::Plan {
                    prefix: "h".to_owned(),
                    count: channels.max(1),
                    all: join == crate::cli::Join::All,
                },
                before,
                missed,
                spread: Duration::from_millis(spread_ms),
                reconnect_concurrency,
                without_id,
                publish_during: Duration::from_millis(publish_during_ms),
                storm_timeout: Duration::from_secs(storm_timeout),
            };
            resume::run(ctx, o).await
        }
        Scenario::HistoryMemory {
            channels,
            event_bytes,
            batch,
            passes,
            samples,
            settle,
            expire_wait,
        } => {
            let o = history_memory::Opts {
                channels: channels.max(1),
                event_bytes,
                batch: batch.max(1),
                passes: passes.max(1),
                samples,
                settle: Duration::from_secs_f64(settle.max(0.0)),
                expire_wait: Duration::from_secs_f64(expire_wait.max(0.0)),
            };
            history_memory::run(ctx, o).await
        }
        Scenario::Soak {
            minutes,
            streams,
            churners,
            send_rate,
            publish_rate,
            subscribe_rate,
            backend_delay_ms: _,
            max_payload_bytes,
            report_every,
        } => {
            let o = soak::Opts {
                minutes,
                streams,
                churners,
                send_rate,
                publish_rate,
                subscribe_rate,
                max_payload_bytes,
                report_every: Duration::from_secs_f64(report_every.max(1.0)),
            };
            soak::run(ctx, o).await
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM (never, if the handlers cannot be installed).
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

async fn finish(mut ctx: Ctx) -> u8 {
    let errors = ctx.sink.errors_sorted();
    if !errors.is_empty() {
        let list: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        ctx.report
            .line(format!("stream failures and endings: {}", list.join("; ")));
    }
    ctx.report.set(
        "stream_errors",
        errors
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect::<serde_json::Map<_, _>>(),
    );
    let bad = ctx
        .backend
        .bad_callbacks
        .load(std::sync::atomic::Ordering::Relaxed);
    if bad > 0 {
        ctx.report
            .fail(format!("{bad} malformed callbacks from the gateway"));
    }
    ctx.cluster_metrics().await;
    // All nodes drain at once (their disconnect callbacks still reach the backend double), then
    // Redis stops: a draining node may still talk to it.
    for t in &mut ctx.nodes {
        t.terminate();
    }
    let mut exits = Vec::new();
    for k in 0..ctx.nodes.len() {
        if let Some(how) = ctx.nodes[k].stop(GATEWAY_STOP_GRACE).await {
            let who = if ctx.common.cluster.is_some() {
                format!("node {k}")
            } else {
                "gateway".to_owned()
            };
            ctx.report.line(format!("{who} {how}"));
            if !how.contains("exited after SIGTERM: exit status: 0") {
                ctx.report
                    .fail(format!("{who} did not stop cleanly: {how}"));
            }
            exits.push(how);
        }
    }
    match exits.len() {
        0 => {}
        1 if ctx.common.cluster.is_none() => ctx.report.set("gateway_exit", exits[0].clone()),
        _ => ctx.report.set("gateway_exit", exits),
    }
    if let Some(redis) = ctx.redis.as_mut() {
        if let Some(how) = redis.stop(GATEWAY_STOP_GRACE).await {
            ctx.report.line(format!("redis-server {how}"));
            ctx.report.set("redis_exit", how.clone());
            if !how.contains("exited after SIGTERM: exit status: 0") {
                ctx.report
                    .fail(format!("redis-server did not stop cleanly: {how}"));
            }
        }
    }
    // Give the stderr drains a moment to see the last lines.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut warn, mut error, mut first) = (0, 0, Vec::new());
    for k in 0..ctx.nodes.len() {
        let l = ctx.nodes[k].log.lock().unwrap();
        warn += l.warn;
        error += l.error;
        let prefix = if ctx.common.cluster.is_some() {
            format!("node {k}: ")
        } else {
            String::new()
        };
        first.extend(l.first.iter().map(|line| format!("{prefix}{line}")));
    }
    if warn + error > 0 {
        ctx.report.line(format!(
            "gateway logged {warn} WARN and {error} ERROR lines; first ones:\n  {}",
            first.join("\n  ")
        ));
    }
    ctx.report
        .set("gateway_log", json!({"warn": warn, "error": error}));
    ctx.report.finish()
}
