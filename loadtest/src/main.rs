//! `sse-load`: the load generator for sse-gateway, and its backend double.
//!
//! # Layout
//! Data flow: `main` parses options, raises the fd limit, pins itself and starts ONE current-thread
//! runtime (so the load stays on its own core) → `backend` answers the gateway's callbacks and learns
//! every token → `gateway` spawns or attaches to the gateway → a `scenario` opens streams through
//! `stream` (raw TCP from 127.0.0.2–254, parsed by `http`), sends through `send`, and reports through
//! `report` (human lines + one `SUMMARY {json}` line), reading `/proc` through `sys`.
//!
//! - `cli`      options and scenarios (clap derive)
//! - `sys`      fd limit, CPU pinning, wall clock, Pss / sockstat / CPU seconds from `/proc`
//! - `hist`     fixed-size latency histogram
//! - `http`     response head, chunked decoder, SSE parser, payload `"<seq> <ts_us>"`
//! - `stream`   one SSE stream per task, the `Pool` of them, per-stream `Slot`s and the shared `Sink`
//! - `send`     keep-alive client for `/internal/*`, and the per-node `Router` (`--via`)
//! - `serve`    tiny JSON HTTP server (callbacks, `hold` control port)
//! - `backend`  the callback double and the exactly-once disconnect audit
//! - `gateway`  the target: spawned or attached
//! - `redis`    `--cluster`'s redis-server: start on a free port, PING, INFO counters, stop
//! - `cluster`  `--cluster N`: Redis + N gateways, readiness, the nodes' cluster metrics
//! - `report`   results, checks, deadlines, exit status
//! - `scenario` density, unicast, broadcast, connect_rate, idle, hold, soak, resume (reconnect
//!   storm with `Last-Event-ID`), history_memory (`HISTORY_MAX_BYTES` against RSS)

mod backend;
mod cli;
mod cluster;
mod gateway;
mod hist;
mod http;
mod redis;
mod report;
mod scenario;
mod send;
mod serve;
mod stream;
mod sys;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let nofile = match sys::raise_nofile() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("sse-load: cannot raise RLIMIT_NOFILE: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(cpu) = cli.common.load_cpu {
        if let Err(e) = sys::pin_to_cpu(cpu) {
            eprintln!("sse-load: cannot pin to CPU {cpu}: {e}");
            return ExitCode::from(2);
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    let code = rt.block_on(scenario::run(cli, nofile));
    // Streams and helper tasks are dropped with the runtime; never wait on them.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code)
}
