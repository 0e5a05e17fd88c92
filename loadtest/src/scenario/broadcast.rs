//! `broadcast`: one event to every stream per round — N sends by token through C connections now,
//! one `/internal/publish` to a channel with `--publish` (the backend double then answers connects
//! with `{"channels":[<channel>]}`). Every payload carries the round number and the round's start
//! time, so delivery latency is measured from the first request of the round.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::Ctx;
use crate::hist::{fmt_us, Histogram};
use crate::report::round;
use crate::send::{publish_body, send_body};
use crate::stream::Slot;
use crate::sys::now_us;

pub struct Opts {
    pub streams: usize,
    pub rounds: u64,
    pub concurrency: usize,
    pub publish: bool,
    pub channel: String,
    pub interval: Duration,
    pub round_timeout: Duration,
    /// Requests each per-token sender pipelines per write.
    pub pipeline: usize,
    /// Sends/s to random single tokens during the run, to measure how a fan-out stalls them.
    pub probe_rate: u64,
}

/// Request latency of the probe's sends, split by whether a round was in progress when each began.
#[derive(Default)]
struct Probe {
    during: Histogram,
    between: Histogram,
    failed: u64,
}

/// Sends `{"token":<random open token>,"event":{"data":"probe"}}` at `rate` per second until `stop`
/// (polled at least every 10 ms, so a slow rate still stops promptly).
async fn probe(
    mut router: crate::send::Router,
    tokens: Vec<(String, usize)>,
    rate: u64,
    in_round: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Probe {
    let mut out = Probe::default();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut i: usize = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let (token, node) = &tokens[(i >> 33) % tokens.len()];
        let body = format!(
            r#"{{"token":"{token}","event":{{"data":"{}"}}}}"#,
            crate::stream::PROBE_DATA
        );
        let during = in_round.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let ok = matches!(
            router
                .for_holder(*node)
                .post("/internal/send", body.as_bytes())
                .await,
            Ok((200, _))
        );
        let us = t0.elapsed().as_micros() as u64;
        match (ok, during) {
            (false, _) => out.failed += 1,
            (true, true) => out.during.record(us),
            (true, false) => out.between.record(us),
        }
    }
    out
}

pub async fn run(ctx: &mut Ctx, o: Opts) {
    let pool = ctx.open_streams(o.streams).await;
    let open = pool.open_with_token();
    let n = open.len() as u64;
    if n == 0 {
        ctx.report.fail("no open stream with a known token");
        ctx.close_and_audit(pool).await;
        return;
    }
    let c = o.concurrency.clamp(1, open.len());
    let shares: Vec<Arc<Vec<Arc<Slot>>>> = (0..c)
        .map(|k| {
            Arc::new(
                open.iter()
                    .skip(k)
                    .step_by(c)
                    .map(|&i| pool.slots[i].clone())
                    .collect(),
            )
        })
        .collect();
    // Per-token senders, each with a connection per node (`--via`); the publish goes to the
    // `--via` node (node 0 with `other`/`holder`).
    let mut senders: Vec<_> = (0..c).map(|_| Some(ctx.router())).collect();
    let mut publisher = ctx.sender();
    ctx.report.line(format!(
        "broadcast to {n} streams, {} rounds, {}",
        o.rounds,
        if o.publish {
            format!("one publish to channel {:?} per round", o.channel)
        } else {
            format!(
                "{n} sends by token per round over {c} connections, {} per write",
                o.pipeline.max(1)
            )
        }
    ));
    let in_round = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_probe = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = (o.probe_rate > 0).then(|| {
        let tokens: Vec<(String, usize)> = open
            .iter()
            .filter_map(|&i| {
                let slot = &pool.slots[i];
                slot.token.get().map(|t| (t.clone(), slot.node))
            })
            .collect();
        // Its own thread and runtime: on the load generator's runtime the probe's answers would
        // wait behind the 18k stream reads of a round, and the figure would be ours, not the
        // gateway's. The kernel wakes this mostly-sleeping thread ahead of the busy one.
        let (sender, rate) = (ctx.router(), o.probe_rate);
        let (in_round, stop) = (in_round.clone(), stop_probe.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("probe runtime")
                .block_on(probe(sender, tokens, rate, in_round, stop))
        })
    });
    if ctx.common.cluster.is_some() {
        let on: Vec<usize> = (0..ctx.nodes.len())
            .map(|k| open.iter().filter(|&&i| pool.slots[i].node == k).count())
            .collect();
        ctx.report.line(format!(
            "cluster: streams per node {on:?}; {} via {}",
            if o.publish {
                "the publish"
            } else {
                "per-token sends"
            },
            if o.publish {
                format!("node {}", ctx.common.via.home())
            } else {
                super::unicast::via_words(ctx.common.via)
            }
        ));
    }
    let redis_before = ctx.redis_stats().await;
    let cpu = ctx.cpu();
    let mut round_times = Histogram::default();
    let mut send_times = Histogram::default();
    let (mut missing_total, mut send_failed, mut rows) = (0u64, 0u64, Vec::new());
    let sink = ctx.sink.clone();
    for r in 1..=o.rounds {
        sink.round_delivered.store(0, Ordering::Relaxed);
        sink.round_last_us.store(0, Ordering::Relaxed);
        sink.round.store(r, Ordering::Relaxed);
        let t0_us = now_us();
        let t0 = Instant::now();
        in_round.store(true, Ordering::Relaxed);
        let (accepted, failures) = if o.publish {
            let body = publish_body(&o.channel, "bcast", r, t0_us);
            match publisher.post("/internal/publish", &body).await {
                Ok((200, b)) => {
                    let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                    (v["delivered"].as_u64().unwrap_or(0), vec![])
                }
                Ok((st, b)) => (
                    0,
                    vec![format!(
                        "publish status {st}: {}",
                        String::from_utf8_lossy(&b)
                    )],
                ),
                Err(e) => (0, vec![format!("publish: {e}")]),
            }
        } else {
            let mut tasks = Vec::new();
            for (k, share) in shares.iter().enumerate() {
                let mut s = senders[k]
                    .take()
                    .expect("sender is returned after each round");
                let share = share.clone();
                let pipeline = o.pipeline.max(1);
                tasks.push(tokio::spawn(async move {
                    let (mut ok, mut fails) = (0u64, Vec::new());
                    for batch in share.chunks(pipeline) {
                        // Pipelined requests go per node they are routed to.
                        let mut answers = Vec::with_capacity(batch.len());
                        let mut routes: Vec<usize> =
                            batch.iter().map(|sl| s.route(sl.node)).collect();
                        routes.sort_unstable();
                        routes.dedup();
                        for node in routes {
                            let bodies: Vec<Vec<u8>> = batch
                                .iter()
                                .filter(|slot| s.route(slot.node) == node)
                                .map(|slot| {
                                    let token = slot.token.get().expect("open_with_token filtered");
                                    send_body(token, "bcast", r, t0_us, "")
                                })
                                .collect();
                            if pipeline == 1 {
                                answers.push(s.node(node).post("/internal/send", &bodies[0]).await);
                            } else {
                                answers.extend(
                                    s.node(node).post_pipelined("/internal/send", &bodies).await,
                                );
                            }
                        }
                        for answer in answers {
                            match answer {
                                Ok((200, _)) => ok += 1,
                                Ok((st, b)) => fails
                                    .push(format!("status {st}: {}", String::from_utf8_lossy(&b))),
                                Err(e) => fails.push(e),
                            }
                        }
                    }
                    (s, ok, fails)
                }));
            }
            let (mut ok, mut fails) = (0, Vec::new());
            for (k, t) in tasks.into_iter().enumerate() {
                match t.await {
                    Ok((s, o, f)) => {
                        senders[k] = Some(s);
                        ok += o;
                        fails.extend(f);
                    }
                    Err(e) => {
                        senders[k] = Some(ctx.router());
                        fails.push(format!("sender task: {e}"));
                    }
                }
            }
            (ok, fails)
        };
        let send_us = t0.elapsed().as_micros() as u64;
        send_times.record(send_us);
        send_failed += failures.len() as u64;
        if !failures.is_empty() {
            ctx.report.line(format!(
                "  round {r}: {} failed requests, first: {}",
                failures.len(),
                failures[0]
            ));
        }
        // Deliveries expected: every stream (publish) or every accepted send.
        let expected = match (o.publish, failures.is_empty()) {
            (true, true) => n,
            (true, false) => 0, // the publish failed: nothing to wait for
            (false, _) => accepted,
        };
        if o.publish && accepted != n {
            ctx.report.fail(format!(
                "round {r}: publish answered delivered={accepted}, {n} streams joined"
            ));
        }
        let deadline = t0 + o.round_timeout;
        while sink.round_delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        in_round.store(false, Ordering::Relaxed);
        let delivered = sink.round_delivered.load(Ordering::Relaxed);
        let last = sink.round_last_us.load(Ordering::Relaxed);
        let round_us = last.saturating_sub(t0_us);
        let missing = n.saturating_sub(delivered);
        missing_total += missing;
        if delivered < expected {
            ctx.report.missed(format!(
                "round {r}: {delivered} of {expected} deliveries after {:?}",
                o.round_timeout
            ));
        }
        round_times.record(round_us);
        ctx.report.line(format!(
            "round {r}: requests done in {}, last delivery after {}, delivered {delivered}/{n}, missing {missing}",
            fmt_us(send_us),
            fmt_us(round_us)
        ));
        rows.push(json!({"round": r, "send_us": send_us, "round_us": round_us, "delivered": delivered, "missing": missing}));
        if !ctx.check_alive() {
            break;
        }
        tokio::time::sleep(o.interval).await;
    }
    let cpu_s = cpu.elapsed();
    stop_probe.store(true, Ordering::Relaxed);
    let probed = prober.and_then(|thread| thread.join().ok());
    if let Some(p) = &probed {
        ctx.report.line(format!(
            "unrelated sends during rounds: {}",
            p.during.human()
        ));
        ctx.report.line(format!(
            "unrelated sends between rounds: {}",
            p.between.human()
        ));
        if p.failed > 0 {
            ctx.report.fail(format!("{} probe sends failed", p.failed));
        }
    }
    let delivered = sink.events.load(Ordering::Relaxed);
    let delivery = sink.latency.lock().unwrap().clone();
    let ooo = sink.out_of_order.load(Ordering::Relaxed);
    ctx.report.line(format!(
        "first request -> last delivery per round: {}",
        round_times.human()
    ));
    ctx.report.line(format!(
        "delivery latency from round start: {}",
        delivery.human()
    ));
    let with_id = sink.with_id.load(Ordering::Relaxed);
    ctx.report.line(format!(
        "deliveries {delivered}, missing {missing_total}, out-of-order {ooo}, failed requests {send_failed}; \
         {with_id} carried an id{}",
        if with_id > 0 && o.publish {
            " (history on: the gateway's position, PROTOCOL §11)"
        } else {
            ""
        }
    ));
    if let Some(c) = cpu_s {
        ctx.report.line(format!(
            "{} CPU during rounds: {c:.2} s = {:.1} µs per delivered event",
            if cpu.len() > 1 {
                "gateways + redis"
            } else {
                "gateway"
            },
            c * 1e6 / delivered.max(1) as f64
        ));
    }
    ctx.cpu_breakdown(&cpu, "cpu_by_process");
    ctx.redis_report(redis_before, delivered).await;
    ctx.report.set(
        "broadcast",
        json!({
            "streams": n, "rounds": o.rounds, "publish": o.publish, "concurrency": c,
            "round_time": round_times.json(), "request_phase": send_times.json(),
            "delivery_latency": delivery.json(), "delivered": delivered, "missing": missing_total,
            "out_of_order": ooo, "failed_requests": send_failed, "per_round": rows,
            "with_id": with_id,
            "gateway_cpu_s": cpu_s.map(|c| round(c, 3)),
            "cpu_us_per_event": cpu_s.map(|c| round(c * 1e6 / delivered.max(1) as f64, 2)),
            "probe": probed.as_ref().map(|p| json!({
                "rate": o.probe_rate, "during_rounds": p.during.json(),
                "between_rounds": p.between.json(), "failed": p.failed,
            })),
        }),
    );
    if missing_total > 0 {
        ctx.report
            .fail(format!("{missing_total} deliveries missing"));
    }
    if send_failed > 0 {
        ctx.report.fail(format!("{send_failed} requests failed"));
    }
    if ooo > 0 {
        ctx.report.fail(format!("{ooo} out-of-order deliveries"));
    }
    ctx.close_and_audit(pool).await;
}
