//! `idle`: N streams doing nothing for T seconds: heartbeats per stream, and what the gateway's
//! heartbeat timer costs in CPU.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use super::Ctx;
use crate::report::round;
use crate::stream::OPEN;

pub async fn run(ctx: &mut Ctx, streams: usize, duration: f64, heartbeat: Option<f64>) {
    let pool = ctx.open_streams(streams).await;
    let interval = heartbeat.unwrap_or_else(|| {
        ctx.common
            .gateway_env
            .iter()
            .find(|(k, _)| k == "HEARTBEAT_INTERVAL_SECONDS")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(15.0)
    });
    for s in &pool.slots {
        s.heartbeats.store(0, Ordering::Relaxed);
    }
    let cpu = ctx.cpu();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(duration.max(0.0));
    ctx.report.line(format!(
        "idle for {duration} s with {} streams (heartbeat every {interval} s)",
        pool.open_count()
    ));
    while Instant::now() < end {
        tokio::time::sleep_until(end.min(Instant::now() + Duration::from_secs(1)).into()).await;
        if !ctx.check_alive() {
            break;
        }
    }
    let cpu_s = cpu.elapsed();
    let secs = t0.elapsed().as_secs_f64();
    let mut beats: Vec<u64> = pool
        .slots
        .iter()
        .filter(|s| s.state.load(Ordering::Relaxed) == OPEN)
        .map(|s| s.heartbeats.load(Ordering::Relaxed))
        .collect();
    beats.sort_unstable();
    let still_open = beats.len();
    let total: u64 = beats.iter().sum();
    let (min, max) = (
        beats.first().copied().unwrap_or(0),
        beats.last().copied().unwrap_or(0),
    );
    let avg = total as f64 / still_open.max(1) as f64;
    let expect = (secs / interval).floor();
    ctx.report.line(format!(
        "heartbeats per stream: min {min} avg {avg:.2} max {max} (expected about {expect:.0}); {still_open} of {} streams still open",
        pool.slots.len()
    ));
    if let Some(c) = cpu_s {
        ctx.report.line(format!(
            "gateway CPU while idle: {c:.3} s in {secs:.1} s = {:.2}% of a core, {:.2} µs per heartbeat",
            c * 100.0 / secs.max(1e-9),
            c * 1e6 / total.max(1) as f64
        ));
    }
    ctx.report.set(
        "idle",
        json!({
            "streams_open": still_open, "seconds": round(secs, 3), "heartbeat_interval_s": interval,
            "heartbeats_total": total, "per_stream_min": min, "per_stream_avg": round(avg, 3), "per_stream_max": max,
            "expected_per_stream": expect, "gateway_cpu_s": cpu_s.map(|c| round(c, 3)),
            "cpu_us_per_heartbeat": cpu_s.map(|c| round(c * 1e6 / total.max(1) as f64, 3)),
        }),
    );
    if still_open < pool.slots.len() {
        ctx.report.fail(format!(
            "{} streams ended while idle",
            pool.slots.len() - still_open
        ));
    }
    if expect >= 2.0 && (min as f64) < expect - 1.0 {
        ctx.report.fail(format!(
            "some stream got {min} heartbeats in {secs:.1} s, expected about {expect:.0}"
        ));
    }
    if max as f64 > expect + 2.0 {
        ctx.report.fail(format!(
            "some stream got {max} heartbeats in {secs:.1} s, expected about {expect:.0}"
        ));
    }
    ctx.close_and_audit(pool).await;
}
