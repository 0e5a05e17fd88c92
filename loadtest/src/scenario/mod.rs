//! The scenarios and what they share: a `Ctx` holding the target, the backend double, the stream
//! sink and the report, built once by `run`, which also tears everything down within deadlines.

mod broadcast;
mod connect_rate;
mod density;
mod hold;
mod idle;
mod soak;
mod unicast;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;

use crate::backend::Backend;
use crate::cli::{Cli, Common, Scenario};
use crate::gateway::Target;
use crate::report::{Report, EXIT_USAGE};
use crate::send::Sender;
use crate::stream::{Pool, Sink, StreamConfig};
use crate::sys::{CpuMeter, FD_RESERVE};

/// Time a spawned gateway gets to drain after SIGTERM before it is killed.
const GATEWAY_STOP_GRACE: Duration = Duration::from_secs(20);

pub struct Ctx {
    pub common: Common,
    pub target: Target,
    pub backend: Arc<Backend>,
    pub sink: Arc<Sink>,
    pub report: Report,
    /// Streams this process can hold: the fd limit less `FD_RESERVE`.
    pub max_streams: usize,
}

impl Ctx {
    pub fn pool(&self) -> Pool {
        Pool::new(
            self.sink.clone(),
            self.backend.clone(),
            StreamConfig {
                target: self.target.public,
                path: self.common.path.clone(),
                sources: self.common.sources,
                head_timeout: Duration::from_secs(self.common.head_timeout),
            },
            self.common.open_concurrency,
        )
    }

    pub fn sender(&self) -> Sender {
        let s = Sender::new(self.target.internal, self.common.internal_secret.as_deref());
        if self.common.target == crate::cli::TargetKind::Nchan {
            s.nchan()
        } else {
            s
        }
    }

    pub fn cpu(&self) -> CpuMeter {
        CpuMeter::start(self.target.pid)
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

    /// Fails the run when the spawned gateway died.
    pub fn check_alive(&mut self) -> bool {
        if let Some(st) = self.target.exited() {
            self.report
                .fail(format!("the gateway exited during the run: {st}"));
            return false;
        }
        true
    }
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
    let target = match (&common.gateway_bin, &common.url) {
        (Some(bin), None) => {
            Target::spawn(
                bin,
                cb_addr,
                &common.gateway_env,
                common.server_cpu,
                common.gateway_log.as_deref(),
            )
            .await
        }
        (None, Some(url)) => Target::attach(url, common.internal_url.as_deref(), common.pid),
        _ => Err("give exactly one of --gateway-bin PATH or --url URL".to_owned()),
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sse-load: {e}");
            return EXIT_USAGE;
        }
    };
    let max_streams = nofile.saturating_sub(FD_RESERVE) as usize;
    println!(
        "sse-load {}: gateway public {} internal {} pid {} ({}); callback server http://{cb_addr}/callback; \
         open-file limit {nofile} -> at most {max_streams} streams; load cpu {:?}, server cpu {:?}",
        cli.scenario.name(),
        target.public,
        target.internal,
        target.pid.map_or("unknown (no --pid: no memory/CPU figures)".to_owned(), |p| p.to_string()),
        if attached { "attached" } else { "spawned" },
        common.load_cpu,
        common.server_cpu,
    );
    report.set(
        "gateway",
        json!({"public": target.public.to_string(), "internal": target.internal.to_string(),
               "pid": target.pid, "spawned": !attached}),
    );
    report.set("callback", cb_addr.to_string());
    let sink = Arc::new(Sink::default());
    let mut ctx = Ctx {
        common,
        target,
        backend,
        sink,
        report,
        max_streams,
    };
    match cli.scenario {
        Scenario::Density { steps, settle } => density::run(&mut ctx, &steps, settle).await,
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
            unicast::run(&mut ctx, o).await
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
            broadcast::run(&mut ctx, o).await
        }
        Scenario::ConnectRate {
            concurrency,
            duration,
            count,
            abandon_ms,
        } => connect_rate::run(&mut ctx, concurrency, duration, count, abandon_ms).await,
        Scenario::Idle {
            streams,
            duration,
            heartbeat,
        } => idle::run(&mut ctx, streams, duration, heartbeat).await,
        Scenario::Hold {
            streams,
            control,
            duration,
        } => hold::run(&mut ctx, streams, control, duration).await,
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
            soak::run(&mut ctx, o).await
        }
    }
    finish(ctx).await
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
    if let Some(how) = ctx.target.stop(GATEWAY_STOP_GRACE).await {
        ctx.report.line(format!("gateway {how}"));
        ctx.report.set("gateway_exit", how.clone());
        if !how.contains("exited after SIGTERM: exit status: 0") {
            ctx.report
                .fail(format!("gateway did not stop cleanly: {how}"));
        }
    }
    // Give the stderr drain a moment to see the last lines.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (warn, error, first) = {
        let l = ctx.target.log.lock().unwrap();
        (l.warn, l.error, l.first.clone())
    };
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
