//! `density`: memory per stream. Opens streams in steps; at each step waits for every head, settles,
//! and reads the gateway's Pss (`/proc/PID/smaps_rollup`) and the kernel's TCP memory
//! (`/proc/net/sockstat`, both ends of every loopback connection). The slope over the steps is the
//! cost of one more stream.

use std::time::Duration;

use serde_json::json;

use super::Ctx;
use crate::report::{mib, round, slope};
use crate::sys::{pss_bytes, rss_bytes, socket_slab_bytes, tcp_stat};

struct Point {
    streams: u64,
    pss: Option<u64>,
    redis_pss: Option<u64>,
    tcp_mem: u64,
    tcp_inuse: u64,
    slab: Option<u64>,
}

pub async fn run(ctx: &mut Ctx, steps: &[usize], settle: f64) {
    // Every gateway's Pss, summed (one gateway: its own); Redis's apart.
    let pids = ctx.gateway_pids();
    let redis_pid = ctx.redis.as_ref().and_then(|r| r.pid);
    let settle = Duration::from_secs_f64(settle.max(0.0));
    if let Some(&biggest) = steps.iter().max() {
        ctx.cap(biggest);
    }
    let mut steps: Vec<usize> = steps.iter().map(|&s| s.min(ctx.max_streams)).collect();
    steps.dedup();
    let me = std::process::id();
    tokio::time::sleep(settle).await;
    let base = measure(pids.as_deref(), redis_pid, 0);
    if ctx.nodes.len() > 1 {
        ctx.report.line(format!(
            "gateway Pss below is the sum over the {} nodes; streams go round-robin over them",
            ctx.nodes.len()
        ));
    }
    ctx.report.line(format!(
        "baseline: gateway Pss {}  kernel TCP mem {}  socket slab {}  TCP sockets in use {} (machine-wide)",
        base.pss.map_or("n/a".into(), mib),
        mib(base.tcp_mem),
        base.slab.map_or("n/a".into(), mib),
        base.tcp_inuse
    ));
    ctx.report.line(format!(
        "{:>7} {:>11} {:>12} {:>12} {:>14} {:>15} {:>9} {:>8} {:>10} {:>10}",
        "streams",
        "gw Pss MiB",
        "Pss/stream B",
        "TCP mem MiB",
        "TCP mem/str B",
        "slab/stream B",
        "open s",
        "open/s",
        "gw cpu s",
        "load RSS"
    ));
    let cpu = ctx.cpu();
    let mut points = Vec::new();
    let mut pool = ctx.pool();
    let mut rows = Vec::new();
    for &target in &steps {
        let r = pool.grow(target, ctx.open_timeout()).await;
        if r.deadline_missed {
            ctx.report.missed(format!(
                "step {target}: {} streams without headers after {} s",
                r.pending, ctx.common.open_timeout
            ));
        }
        if r.failed > 0 {
            ctx.report
                .fail(format!("step {target}: {} stream opens failed", r.failed));
        }
        tokio::time::sleep(settle).await;
        if !ctx.check_alive() {
            break;
        }
        let open = pool.open_count();
        if open < target as u64 {
            ctx.report.fail(format!(
                "step {target}: only {open} streams open after settling"
            ));
        }
        let p = measure(pids.as_deref(), redis_pid, open);
        let per = |now: Option<u64>, was: Option<u64>| match (now, was) {
            (Some(a), Some(b)) if open > 0 => Some((a as f64 - b as f64) / open as f64),
            _ => None,
        };
        let pss_per = per(p.pss, base.pss);
        let tcp_per = per(Some(p.tcp_mem), Some(base.tcp_mem));
        let slab_per = per(p.slab, base.slab);
        let load_rss = rss_bytes(me).unwrap_or(0);
        let cpu_s = cpu.elapsed();
        ctx.report.line(format!(
            "{:>7} {:>11} {:>12} {:>12} {:>14} {:>15} {:>9.2} {:>8.0} {:>10} {:>10}",
            open,
            p.pss
                .map_or("n/a".into(), |b| format!("{:.1}", b as f64 / 1048576.0)),
            pss_per.map_or("n/a".into(), |v| format!("{v:.0}")),
            format!("{:.1}", p.tcp_mem as f64 / 1048576.0),
            tcp_per.map_or("n/a".into(), |v| format!("{v:.0}")),
            slab_per.map_or("n/a".into(), |v| format!("{v:.0}")),
            r.elapsed.as_secs_f64(),
            r.established as f64 / r.elapsed.as_secs_f64().max(1e-9),
            cpu_s.map_or("n/a".into(), |c| format!("{c:.2}")),
            mib(load_rss),
        ));
        rows.push(json!({
            "target": target, "open": open, "established": r.established, "failed": r.failed,
            "pending": r.pending, "open_seconds": round(r.elapsed.as_secs_f64(), 3),
            "gateway_pss_bytes": p.pss, "pss_per_stream_vs_baseline": pss_per.map(|v| round(v, 1)),
            "tcp_mem_bytes": p.tcp_mem, "tcp_inuse": p.tcp_inuse,
            "tcp_mem_per_stream_vs_baseline": tcp_per.map(|v| round(v, 1)),
            "redis_pss_bytes": p.redis_pss, "socket_slab_bytes": p.slab, "socket_slab_per_stream_vs_baseline": slab_per.map(|v| round(v, 1)),
            "gateway_cpu_s": cpu_s.map(|c| round(c, 3)), "load_rss_bytes": load_rss,
        }));
        points.push(p);
    }
    let cpu_s = cpu.elapsed();
    ctx.report.set(
        "baseline",
        json!({"gateway_pss_bytes": base.pss, "redis_pss_bytes": base.redis_pss, "tcp_mem_bytes": base.tcp_mem}),
    );
    ctx.report.set("steps", rows);
    let pss_pts: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.pss.map(|v| (p.streams as f64, v as f64)))
        .collect();
    let tcp_pts: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.streams as f64, p.tcp_mem as f64))
        .collect();
    let slab_pts: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.slab.map(|v| (p.streams as f64, v as f64)))
        .collect();
    let ends = |pts: &[(f64, f64)]| match (pts.first(), pts.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => Some((b.1 - a.1) / (b.0 - a.0)),
        _ => None,
    };
    let fmt = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0} B/stream"));
    let (pss_ls, pss_fl) = (slope(&pss_pts), ends(&pss_pts));
    let (tcp_ls, tcp_fl) = (slope(&tcp_pts), ends(&tcp_pts));
    let (slab_ls, slab_fl) = (slope(&slab_pts), ends(&slab_pts));
    ctx.report.line(format!(
        "slope gateway Pss:      least-squares {}, first->last step {}",
        fmt(pss_ls),
        fmt(pss_fl)
    ));
    ctx.report.line(format!(
        "slope kernel TCP mem:   least-squares {}, first->last step {}  (both socket ends; loopback)",
        fmt(tcp_ls),
        fmt(tcp_fl)
    ));
    ctx.report.line(format!(
        "slope kernel socket slab: least-squares {}, first->last step {}  (TCP, sock_inode_cache, eventpoll_epi, tcp_bind_bucket; both ends)",
        fmt(slab_ls),
        fmt(slab_fl)
    ));
    let redis_pts: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.redis_pss.map(|v| (p.streams as f64, v as f64)))
        .collect();
    let redis_ls = slope(&redis_pts);
    if let (Some(b), Some(last)) = (base.redis_pss, points.last().and_then(|p| p.redis_pss)) {
        ctx.report.line(format!(
            "redis-server Pss: {} before the first stream, {} at the last step; slope {} (not in the gateway figures)",
            mib(b),
            mib(last),
            fmt(redis_ls)
        ));
    }
    let opened = ctx
        .sink
        .established
        .load(std::sync::atomic::Ordering::Relaxed);
    if let Some(c) = cpu_s {
        ctx.report.line(format!(
            "gateway CPU during opening and holding: {c:.2} s = {:.0} µs per connect",
            c * 1e6 / opened.max(1) as f64
        ));
    }
    ctx.report.set(
        "slope_bytes_per_stream",
        json!({
            "gateway_pss_least_squares": pss_ls.map(|v| round(v, 1)),
            "gateway_pss_first_to_last": pss_fl.map(|v| round(v, 1)),
            "tcp_mem_least_squares": tcp_ls.map(|v| round(v, 1)),
            "tcp_mem_first_to_last": tcp_fl.map(|v| round(v, 1)),
            "socket_slab_least_squares": slab_ls.map(|v| round(v, 1)),
            "socket_slab_first_to_last": slab_fl.map(|v| round(v, 1)),
            "redis_pss_least_squares": redis_ls.map(|v| round(v, 1)),
        }),
    );
    ctx.report.set("gateway_cpu_s", cpu_s.map(|c| round(c, 3)));
    ctx.report.set(
        "cpu_us_per_connect",
        cpu_s.map(|c| round(c * 1e6 / opened.max(1) as f64, 1)),
    );
    ctx.close_and_audit(pool).await;
}

fn measure(pids: Option<&[u32]>, redis: Option<u32>, streams: u64) -> Point {
    let tcp = tcp_stat().unwrap_or_default();
    Point {
        streams,
        pss: pids.and_then(|ps| ps.iter().map(|&p| pss_bytes(p).ok()).sum()),
        redis_pss: redis.and_then(|p| pss_bytes(p).ok()),
        tcp_mem: tcp.mem_bytes,
        tcp_inuse: tcp.inuse,
        slab: socket_slab_bytes().ok(),
    }
}
