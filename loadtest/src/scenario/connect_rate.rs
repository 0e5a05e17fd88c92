//! `connect-rate`: C loops of open -> 200 -> close for a bounded time and count. Afterwards every
//! accepted token must get exactly one disconnect callback (waited for, bounded).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::Ctx;
use crate::hist::Histogram;
use crate::report::round;
use crate::stream::{open, source_for, OpenError};

/// Client ids for this scenario start here, far from any pool's 0.. ids.
const FIRST_CLIENT: u64 = 1 << 40;

pub async fn run(
    ctx: &mut Ctx,
    concurrency: usize,
    duration: f64,
    count: u64,
    abandon_ms: Option<u64>,
) {
    let c = concurrency.clamp(1, ctx.max_streams.max(1));
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(duration.max(0.0));
    let head_timeout = match abandon_ms {
        Some(ms) => Duration::from_millis(ms),
        None => Duration::from_secs(ctx.common.head_timeout),
    };
    let abandoning = abandon_ms.is_some();
    ctx.report.line(format!(
        "connect loop: {c} concurrent, {duration} s or {count} connects"
    ));
    let cpu = ctx.cpu();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c {
        let next = next.clone();
        let (dsts, path, sources) = (ctx.publics(), ctx.common.path.clone(), ctx.common.sources);
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::default();
            let mut fails: HashMap<String, u64> = HashMap::new();
            let mut abandoned = 0u64;
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let client = FIRST_CLIENT + i;
                let dst = dsts[i as usize % dsts.len()];
                match open(client, source_for(i, sources), dst, &path, head_timeout).await {
                    Ok(o) => {
                        hist.record(o.time_to_headers.as_micros() as u64);
                        drop(o.sock);
                    }
                    Err(OpenError::Timeout) if abandoning => abandoned += 1,
                    Err(e) => *fails.entry(e.to_string()).or_default() += 1,
                }
            }
            (hist, fails, abandoned)
        }));
    }
    let mut hist = Histogram::default();
    let mut fails: HashMap<String, u64> = HashMap::new();
    let mut abandoned = 0;
    for t in tasks {
        match t.await {
            Ok((h, f, a)) => {
                abandoned += a;
                hist.merge(&h);
                for (k, v) in f {
                    *fails.entry(k).or_default() += v;
                }
            }
            Err(e) => ctx.report.fail(format!("connect task failed: {e}")),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let ok = hist.count();
    let failed: u64 = fails.values().sum();
    ctx.report.line(format!(
        "connects: {ok} ok in {secs:.2} s = {:.0}/s; abandoned before headers {abandoned}; failed {failed}",
        ok as f64 / secs.max(1e-9)
    ));
    for (k, v) in &fails {
        ctx.report.line(format!("  connect failure {k}: {v}"));
    }
    ctx.report
        .line(format!("time to headers: {}", hist.human()));
    let (audit, done) = ctx
        .backend
        .wait_disconnects(Duration::from_secs(ctx.common.drain_timeout))
        .await;
    let cpu_s = cpu.elapsed();
    let callbacks = ctx.backend.connects.load(Ordering::Relaxed);
    ctx.report.line(format!(
        "connect callbacks {callbacks}; disconnect callbacks: {}",
        audit.human()
    ));
    if let Some(cpu) = cpu_s {
        ctx.report.line(format!(
            "gateway CPU: {cpu:.2} s = {:.0} µs per connect attempt (open + callback + close + disconnect callback)",
            cpu * 1e6 / (ok + abandoned).max(1) as f64
        ));
    }
    ctx.report.set(
        "connect_rate",
        json!({
            "concurrency": c, "seconds": round(secs, 3), "ok": ok, "failed": failed, "failures": fails,
            "abandoned": abandoned, "connects_per_s": round(ok as f64 / secs.max(1e-9), 1), "time_to_headers": hist.json(),
            "connect_callbacks": callbacks, "disconnect_audit": audit.json(),
            "gateway_cpu_s": cpu_s.map(|c| round(c, 3)),
            "cpu_us_per_connect": cpu_s.map(|c| round(c * 1e6 / (ok + abandoned).max(1) as f64, 1)),
        }),
    );
    if failed > 0 {
        ctx.report.fail(format!("{failed} connects failed"));
    }
    if abandoning && abandoned > 0 {
        ctx.report.line(format!(
            "{abandoned} clients left with their connect callback in flight: each accepted token must still get one disconnect"
        ));
    }
    if callbacks < ok {
        ctx.report.fail(format!(
            "{ok} connects got 200 but only {callbacks} connect callbacks came"
        ));
    }
    if !done {
        ctx.report.missed(format!(
            "{} tokens still without a disconnect callback after {} s",
            audit.without_disconnect, ctx.common.drain_timeout
        ));
    }
    if !audit.ok() {
        ctx.report.fail(format!(
            "disconnect callbacks not exactly once: {}",
            audit.human()
        ));
    }
    ctx.check_alive();
}
