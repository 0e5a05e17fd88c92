//! Command-line options. Options before or after the scenario name both work (they are global).

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

use crate::send::Via;

#[derive(Parser, Debug)]
#[command(
    name = "sse-load",
    version,
    about = "Load generator and backend double for sse-gateway",
    long_about = "Load generator and backend double for sse-gateway. It runs the connect/disconnect \
callback server itself, holds thousands of SSE streams from source addresses 127.0.0.2-254 on one \
thread, and measures the gateway's memory and CPU from /proc. Prints human-readable results and one \
`SUMMARY {json}` line. Exit status: 0 ok, 1 a phase missed its deadline, 2 bad usage or start-up, \
3 the run finished but a check failed (failed connects, lost events, missing disconnects, ...)."
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Spawn this gateway binary (PORT=0, HOST=127.0.0.1, CALLBACK_URL=<our callback server>).
    #[arg(long, global = true, value_name = "PATH")]
    pub gateway_bin: Option<String>,
    /// Extra env var for the spawned gateway, e.g. HEARTBEAT_INTERVAL_SECONDS=1 (repeatable).
    #[arg(long, global = true, value_name = "K=V", value_parser = parse_kv)]
    pub gateway_env: Vec<(String, String)>,
    /// Write the spawned gateway's stderr to this file (it is drained and scanned for WARN/ERROR anyway).
    #[arg(long, global = true, value_name = "PATH")]
    pub gateway_log: Option<String>,
    /// Attach to a running gateway's public listener instead of spawning one.
    #[arg(long, global = true, value_name = "http://127.0.0.1:PORT")]
    pub url: Option<String>,
    /// The running gateway's internal listener (default: --url).
    #[arg(long, global = true, value_name = "URL")]
    pub internal_url: Option<String>,
    /// Send `Authorization: Bearer <secret>` on /internal/* requests (the gateway's INTERNAL_SECRET).
    #[arg(long, global = true, value_name = "SECRET")]
    pub internal_secret: Option<String>,
    /// The running gateway's pid, for memory and CPU figures (spawned: known).
    #[arg(long, global = true)]
    pub pid: Option<u32>,
    /// Where the callback server listens (attached gateway: point its CALLBACK_URL here) [default: 127.0.0.1:0 when spawning].
    #[arg(long, global = true, value_name = "ADDR")]
    pub callback_listen: Option<SocketAddr>,
    /// Pin the spawned gateway to this CPU (sched_setaffinity before exec).
    #[arg(long, global = true, value_name = "CPU")]
    pub server_cpu: Option<usize>,
    /// Pin this load generator to this CPU.
    #[arg(long, global = true, value_name = "CPU")]
    pub load_cpu: Option<usize>,
    /// Stream opens in flight at once (connect sent, headers not yet read).
    #[arg(long, global = true, default_value_t = 256)]
    pub open_concurrency: usize,
    /// Source addresses to spread streams over, 127.0.0.2 upwards (1..=253).
    #[arg(long, global = true, default_value_t = 253, value_parser = clap::value_parser!(u32).range(1..=253))]
    pub sources: u32,
    /// Path of the stream URL; `?c=<n>` is appended, and `{c}` in it is replaced by n.
    #[arg(long, global = true, default_value = "/s")]
    pub path: String,
    /// Deadline in seconds for each phase that opens streams (a density step, the initial open).
    #[arg(long, global = true, default_value_t = 120)]
    pub open_timeout: u64,
    /// Seconds to wait for the response head of one stream.
    #[arg(long, global = true, default_value_t = 30)]
    pub head_timeout: u64,
    /// Delay every connect-callback answer by this many ms (a slow backend; with `connect-rate
    /// --abandon-ms` it makes clients leave while their connect callback is in flight).
    #[arg(long, global = true, default_value_t = 0)]
    pub callback_delay_ms: u64,
    /// Seconds to wait for outstanding deliveries and for disconnect callbacks after closing.
    #[arg(long, global = true, default_value_t = 30)]
    pub drain_timeout: u64,
    /// Start one `redis-server` and N gateways joined by it (`REDIS_URL`, PROTOCOL §10), all pinned
    /// to `--server-cpu`; streams are spread round-robin over the nodes (stream i on node i % N) and
    /// /internal/* requests go where `--via` says. Needs `--gateway-bin`. `--cluster 1` is one
    /// gateway with `REDIS_URL` set.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=32))]
    pub cluster: Option<u16>,
    /// Where /internal/* requests go in a cluster: a node number (0 = the first), `other` (a
    /// per-token request goes to the node after the one holding the token, so it always crosses
    /// through Redis; publishes to node 0) or `holder` (the node holding the token: local sends).
    /// `other`/`holder` apply to unicast and broadcast; other scenarios use node 0.
    #[arg(long, global = true, default_value = "0", value_parser = parse_via)]
    pub via: Via,
    /// The Redis server binary for `--cluster`.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "/usr/bin/redis-server"
    )]
    pub redis_bin: String,
    /// Seconds to wait for every node of `--cluster` to be ready and to see the others
    /// (`/readyz` 200, `sse_gateway_cluster_nodes` = N).
    #[arg(long, global = true, default_value_t = 30)]
    pub cluster_timeout: u64,
    /// What `--url` is: `gateway`, or `nchan` (nginx + nchan, for comparison: sends become
    /// `POST /pub/<token>`, publishes `POST /pub/<channel>`; use with `--path '/sub/{c}'`).
    #[arg(long, global = true, value_enum, default_value_t = TargetKind::Gateway)]
    pub target: TargetKind,
    /// The backend double's connect answer puts every stream in this channel
    /// (`{"channels":["<name>"]}`), as `broadcast --publish` does; compare.sh uses it so that gateway
    /// streams carry the same shared channel as nchan's `/sub/<id>` + `all` subscribers.
    #[arg(long, global = true, value_name = "CHANNEL")]
    pub join_channel: Option<String>,
}

/// How `resume` puts streams in its channels.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    All,
    One,
}

/// The kind of server under test.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Gateway,
    Nchan,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// Memory per stream: open streams in steps, measure gateway Pss and kernel TCP memory at each.
    Density {
        /// Stream counts to reach, in order.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,18000")]
        steps: Vec<usize>,
        /// Seconds to let things settle at each step before measuring.
        #[arg(long, default_value_t = 3.0)]
        settle: f64,
    },
    /// Sends to random tokens: sends/s, request latency, delivery latency, lost and out-of-order.
    Unicast {
        /// Streams to hold.
        #[arg(short = 'n', long, default_value_t = 1000)]
        streams: usize,
        /// Concurrent keep-alive connections to /internal/send.
        #[arg(short = 'c', long, default_value_t = 8)]
        concurrency: usize,
        /// Seconds to send for.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Total sends per second (0 = as fast as the gateway answers).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Stop after this many sends.
        #[arg(long, default_value_t = 10_000_000)]
        count: u64,
        /// Extra bytes of padding in each event's data.
        #[arg(long, default_value_t = 0)]
        payload_bytes: usize,
        /// Events per request: with N > 1 each sender POSTs `/internal/batch` with N sends
        /// (PROTOCOL §12) and counts each item's own status; `--rate` and `--count` still count
        /// events. nchan has no batch: there it is N requests, one per event.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        batch: u64,
    },
    /// One event to every stream per round: round time, delivery latency, missing deliveries.
    Broadcast {
        /// Streams to hold.
        #[arg(short = 'n', long, default_value_t = 1000)]
        streams: usize,
        /// Rounds.
        #[arg(long, default_value_t = 10)]
        rounds: u64,
        /// Concurrent senders for per-token sends.
        #[arg(short = 'c', long, default_value_t = 8)]
        concurrency: usize,
        /// One /internal/publish per round instead of one send per token (streams join --channel).
        #[arg(long)]
        publish: bool,
        /// Channel the streams join with --publish.
        #[arg(long, default_value = "all")]
        channel: String,
        /// Pause between rounds, ms.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
        /// Deadline for one round's deliveries, seconds.
        #[arg(long, default_value_t = 30)]
        round_timeout: u64,
        /// Per-token sends: requests each sender pipelines per write (1 = one at a time).
        #[arg(long, default_value_t = 1)]
        pipeline: usize,
        /// Also send to random single tokens at this rate (sends/s) on a separate connection and
        /// report their request latency during rounds and between them: how much a big fan-out
        /// stalls unrelated sends. 0 = off.
        #[arg(long, default_value_t = 0)]
        probe_rate: u64,
    },
    /// Open -> 200 -> close loop: connects/s, time-to-headers, exactly one disconnect per connect.
    ConnectRate {
        /// Concurrent connect loops.
        #[arg(short = 'c', long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Stop after this many connects.
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Close each connection after this many ms if its head hasn't come (counted as abandoned,
        /// not failed); with --callback-delay-ms above it, every client leaves mid-callback.
        #[arg(long)]
        abandon_ms: Option<u64>,
    },
    /// Idle streams: heartbeats per stream and the gateway's CPU.
    Idle {
        /// Streams to hold.
        #[arg(short = 'n', long, default_value_t = 1000)]
        streams: usize,
        /// Seconds to stay idle.
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        /// The gateway's heartbeat interval in seconds (default: from --gateway-env, else 15).
        #[arg(long)]
        heartbeat: Option<f64>,
    },
    /// Long mixed run: connect churn, per-token sends, publishes and subscribes against a slow
    /// backend, PSS every minute; at the end lost events, disconnect callbacks exactly once, and
    /// PSS back near its start once idle.
    Soak {
        /// Minutes to run the load for.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Resident streams held for the whole run (half get per-token sends, half publishes).
        #[arg(short = 'n', long, default_value_t = 1000)]
        streams: usize,
        /// Connect-churn loops: open, maybe subscribe, hold 0.1-3 s, leave (or are closed).
        #[arg(long, default_value_t = 16)]
        churners: usize,
        /// Per-token sends per second, in total.
        #[arg(long, default_value_t = 200.0)]
        send_rate: f64,
        /// Publishes per second to the channel the publish-half of the streams joined.
        #[arg(long, default_value_t = 5.0)]
        publish_rate: f64,
        /// Subscribe + publish + unsubscribe cycles per second on scratch channels.
        #[arg(long, default_value_t = 10.0)]
        subscribe_rate: f64,
        /// The backend double answers every callback after a random delay in this range, ms.
        #[arg(long, default_value = "50-300", value_parser = parse_range)]
        backend_delay_ms: (u64, u64),
        /// Largest padding of an event's data; each event draws 0..=this.
        #[arg(long, default_value_t = 4096)]
        max_payload_bytes: usize,
        /// Seconds between progress reports.
        #[arg(long, default_value_t = 60.0)]
        report_every: f64,
    },
    /// Reconnect storm with Last-Event-ID (PROTOCOL §11): streams in channels see some events, all
    /// drop, events are published while they are away, then all reconnect within --spread-ms with
    /// the id they last saw. Time until every stream is live again, events lost or received
    /// twice, gateway CPU per replayed event. Needs history on (--gateway-env HISTORY_SIZE=100).
    Resume {
        /// Streams (they all drop and come back).
        #[arg(short = 'n', long, default_value_t = 10_000)]
        streams: usize,
        /// Channels `h0` .. `h{N-1}`.
        #[arg(long, default_value_t = 10)]
        channels: usize,
        /// `all`: every stream in every channel, events round-robin over the channels, one global
        /// number; `one`: stream c in channel c % channels only, every channel gets each number.
        #[arg(long, value_enum, default_value_t = Join::All)]
        join: Join,
        /// Events every stream sees live before the drop.
        #[arg(long, default_value_t = 10)]
        before: u64,
        /// Events every stream misses while away (published after the drop, replayed on resume).
        #[arg(long, default_value_t = 50)]
        missed: u64,
        /// The reconnects start evenly spread over this many ms.
        #[arg(long, default_value_t = 1000)]
        spread_ms: u64,
        /// Reconnects in flight at once (0: no bound but the spread).
        #[arg(long, default_value_t = 0)]
        reconnect_concurrency: usize,
        /// Reconnect without Last-Event-ID: the storm without the replay, for comparison.
        #[arg(long)]
        without_id: bool,
        /// Also publish one event every this many ms while the streams reconnect (0 = none): they
        /// race each stream's join and replay, and must still arrive exactly once.
        #[arg(long, default_value_t = 0)]
        publish_during_ms: u64,
        /// Deadline, seconds, for the storm (all streams back and live) and for the live phase.
        #[arg(long, default_value_t = 60)]
        storm_timeout: u64,
    },
    /// Memory of the channel history (PROTOCOL §11): one event to each of --channels distinct
    /// channels through /internal/batch, no streams; sse_gateway_history_bytes against
    /// HISTORY_MAX_BYTES, and the gateway's Pss/RSS before and after. Needs HISTORY_SIZE > 0.
    HistoryMemory {
        /// Distinct channels `m0` .. published to, one event each per pass.
        #[arg(long, default_value_t = 100_000)]
        channels: usize,
        /// Bytes of each event's data.
        #[arg(long, default_value_t = 1024)]
        event_bytes: usize,
        /// Publishes per /internal/batch (also capped by MAX_BATCH_ITEMS and MAX_SEND_BYTES from
        /// --gateway-env, else their defaults 1000 and 1 MiB).
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Times over all the channels.
        #[arg(long, default_value_t = 1)]
        passes: u32,
        /// Memory samples while publishing.
        #[arg(long, default_value_t = 10)]
        samples: usize,
        /// Seconds to wait before the first and after the last sample.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
        /// Then wait up to this many seconds for the history to expire (set HISTORY_TTL_SECONDS
        /// short) and sample once more; 0 = don't.
        #[arg(long, default_value_t = 0.0)]
        expire_wait: f64,
    },
    /// Hold streams open with a control port (GET /tokens, GET /stats) for external senders (k6).
    Hold {
        /// Streams to hold.
        #[arg(short = 'n', long, default_value_t = 1000)]
        streams: usize,
        /// Control port address.
        #[arg(long, default_value = "127.0.0.1:0")]
        control: SocketAddr,
        /// Seconds to hold before exiting by itself (SIGINT/SIGTERM end it earlier).
        #[arg(long, default_value_t = 3600.0)]
        duration: f64,
    },
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Density { .. } => "density",
            Scenario::Unicast { .. } => "unicast",
            Scenario::Broadcast { .. } => "broadcast",
            Scenario::ConnectRate { .. } => "connect-rate",
            Scenario::Idle { .. } => "idle",
            Scenario::Hold { .. } => "hold",
            Scenario::Resume { .. } => "resume",
            Scenario::HistoryMemory { .. } => "history-memory",
            Scenario::Soak { .. } => "soak",
        }
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("want K=V")?;
    if k.is_empty() {
        return Err("empty variable name".into());
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn parse_via(s: &str) -> Result<Via, String> {
    match s {
        "other" => Ok(Via::Other),
        "holder" => Ok(Via::Holder),
        _ => s
            .parse()
            .map(Via::Node)
            .map_err(|_| "want a node number, `other` or `holder`".into()),
    }
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u64 = a.trim().parse().map_err(|_| "want MIN-MAX in ms")?;
    let b: u64 = b.trim().parse().map_err(|_| "want MIN-MAX in ms")?;
    if a > b {
        return Err("MIN is above MAX".into());
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn vias() {
        assert_eq!(parse_via("2"), Ok(Via::Node(2)));
        assert_eq!(parse_via("other"), Ok(Via::Other));
        assert_eq!(parse_via("holder"), Ok(Via::Holder));
        assert!(parse_via("x").is_err());
        assert_eq!(Via::Other.route(2, 3), 0);
        assert_eq!(Via::Other.route(0, 3), 1);
        assert_eq!(Via::Holder.route(2, 3), 2);
        assert_eq!(Via::Node(1).route(2, 3), 1);
    }

    #[test]
    fn delay_ranges() {
        assert_eq!(parse_range("50-300"), Ok((50, 300)));
        assert_eq!(parse_range("7"), Ok((7, 7)));
        assert!(parse_range("300-50").is_err());
        assert!(parse_range("a-b").is_err());
    }

    #[test]
    fn global_options_after_the_scenario() {
        let cli = Cli::try_parse_from([
            "sse-load",
            "density",
            "--steps",
            "10,20",
            "--gateway-bin",
            "x",
            "--gateway-env",
            "A=b=c",
        ])
        .unwrap();
        assert_eq!(cli.common.gateway_env, [("A".to_owned(), "b=c".to_owned())]);
        assert!(matches!(cli.scenario, Scenario::Density { ref steps, .. } if steps == &[10, 20]));
    }
}
