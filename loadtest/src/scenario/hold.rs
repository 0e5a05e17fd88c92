//! `hold`: holds N streams until SIGINT/SIGTERM or a deadline and serves a control port so external
//! senders (k6) can drive the gateway: `GET /tokens` lists the open streams' tokens, `GET /stats`
//! reports what arrived. Senders put `"<seq> <ts_us>"` in `data` (seq counting 1, 2, ... per token,
//! ts in µs since the epoch); skipped seqs count as lost, repeated or lower ones as out-of-order.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use super::Ctx;
use crate::stream::{Sink, Slot, OPEN};

pub async fn run(ctx: &mut Ctx, streams: usize, control: SocketAddr, duration: f64) {
    if let Err(e) = crate::gateway::check_loopback(control) {
        ctx.report.fail(format!("--control {e}"));
        return;
    }
    let listener = match TcpListener::bind(control).await {
        Ok(l) => l,
        Err(e) => {
            ctx.report.fail(format!("bind control port {control}: {e}"));
            return;
        }
    };
    let pool = ctx.open_streams(streams).await;
    let addr = listener.local_addr().expect("bound");
    let slots: Arc<Vec<Arc<Slot>>> = Arc::new(pool.slots.clone());
    let sink = ctx.sink.clone();
    let server = tokio::spawn(crate::serve::serve(listener, move |method, path, _body| {
        let (slots, sink) = (slots.clone(), sink.clone());
        async move { control_answer(&method, &path, &slots, &sink) }
    }));
    ctx.report.line(format!(
        "holding {} streams; control on http://{addr} (GET /tokens, GET /stats); until SIGINT/SIGTERM or {duration} s",
        pool.open_count()
    ));
    ctx.report.set("control", addr.to_string());
    let (mut int, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            ctx.report.fail("cannot install signal handlers");
            server.abort();
            ctx.close_and_audit(pool).await;
            return;
        }
    };
    let sleep = tokio::time::sleep(Duration::from_secs_f64(duration.max(0.0)));
    tokio::pin!(sleep);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut sleep => { ctx.report.line("hold: deadline reached"); break; }
            _ = int.recv() => { ctx.report.line("hold: SIGINT"); break; }
            _ = term.recv() => { ctx.report.line("hold: SIGTERM"); break; }
            _ = tick.tick() => { if !ctx.check_alive() { break; } }
        }
    }
    server.abort();
    let stats = stats_json(&pool.slots, &ctx.sink);
    ctx.report.line(format!("hold stats: {stats}"));
    let ended = ctx.sink.ended.load(Ordering::Relaxed);
    if ended > 0 {
        ctx.report.fail(format!(
            "{ended} streams were ended by the gateway while held"
        ));
    }
    ctx.report.set("hold", stats);
    ctx.close_and_audit(pool).await;
}

fn control_answer(
    method: &hyper::Method,
    path: &str,
    slots: &[Arc<Slot>],
    sink: &Sink,
) -> (u16, String) {
    if method != hyper::Method::GET {
        return (405, r#"{"error":"GET only"}"#.into());
    }
    match path.split('?').next().unwrap_or("") {
        "/tokens" => {
            let tokens: Vec<&str> = slots
                .iter()
                .filter(|s| s.state.load(Ordering::Relaxed) == OPEN)
                .filter_map(|s| s.token.get().map(String::as_str))
                .collect();
            (
                200,
                serde_json::to_string(&tokens).expect("strings serialize"),
            )
        }
        "/stats" => (200, stats_json(slots, sink).to_string()),
        _ => (404, r#"{"error":"try GET /tokens or GET /stats"}"#.into()),
    }
}

fn stats_json(slots: &[Arc<Slot>], sink: &Sink) -> serde_json::Value {
    let open = slots
        .iter()
        .filter(|s| s.state.load(Ordering::Relaxed) == OPEN)
        .count();
    let lat = sink.latency.lock().unwrap();
    json!({
        "streams_open": open,
        "streams_ended": sink.ended.load(Ordering::Relaxed),
        "events": sink.events.load(Ordering::Relaxed),
        "lost": sink.gaps.load(Ordering::Relaxed),
        "out_of_order": sink.out_of_order.load(Ordering::Relaxed),
        "unparsed": sink.unparsed.load(Ordering::Relaxed),
        "heartbeats": sink.heartbeats.load(Ordering::Relaxed),
        "latency_p50_us": lat.quantile(0.5),
        "latency_p99_us": lat.quantile(0.99),
        "latency_max_us": lat.max(),
        "latency_n": lat.count(),
    })
}
