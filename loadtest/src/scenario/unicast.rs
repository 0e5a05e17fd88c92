//! `unicast`: sends to random tokens through C keep-alive connections, at full speed or at a set
//! rate, for a bounded time and count. Each sender owns a fixed share of the streams (stream i goes
//! to sender i % C), so two sends to one token are never in flight at once and any out-of-order
//! delivery is the gateway's. With `--batch N` each request is a `POST /internal/batch` of N sends
//! (PROTOCOL §12), each item counted by its own result; against nchan the same N events are N
//! requests (nchan has no batch).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::Ctx;
use crate::hist::Histogram;
use crate::report::round;
use crate::send::send_body;
use crate::stream::Slot;
use crate::sys::now_us;

pub struct Opts {
    pub streams: usize,
    pub concurrency: usize,
    pub duration: f64,
    pub rate: f64,
    pub count: u64,
    pub payload_bytes: usize,
    /// Events per request (1: `/internal/send`, more: `/internal/batch`).
    pub batch: usize,
}

/// A batch being built for one node: (node, the slots of its items in order, the body so far).
type Group<'a> = (usize, Vec<&'a Arc<Slot>>, Vec<u8>);

#[derive(Default)]
struct SenderResult {
    /// Events attempted (items, in a batch).
    events: u64,
    ok: u64,
    latency: Histogram,
    failures: HashMap<String, u64>,
}

/// `--via` in words, for the report.
pub fn via_words(via: crate::send::Via) -> String {
    match via {
        crate::send::Via::Node(k) => format!("node {k}"),
        crate::send::Via::Holder => "the node holding the token (local)".to_owned(),
        crate::send::Via::Other => {
            "the next node after the holder (every request crosses through Redis)".to_owned()
        }
    }
}

/// xorshift64: enough randomness to pick tokens, no dependency.
pub fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

pub async fn run(ctx: &mut Ctx, o: Opts) {
    let pool = ctx.open_streams(o.streams).await;
    let open = pool.open_with_token();
    if open.is_empty() {
        ctx.report
            .fail("no open stream with a known token: nothing to send to");
        ctx.close_and_audit(pool).await;
        return;
    }
    let c = o.concurrency.clamp(1, open.len());
    let pad: String = if o.payload_bytes > 0 {
        format!(" {}", "x".repeat(o.payload_bytes))
    } else {
        String::new()
    };
    let duration = Duration::from_secs_f64(o.duration.max(0.0));
    let remaining = Arc::new(AtomicU64::new(o.count));
    let batch = o.batch.max(1);
    let per_sender_interval =
        (o.rate > 0.0).then(|| Duration::from_secs_f64(c as f64 * batch as f64 / o.rate));
    ctx.report.line(format!(
        "sending to {} tokens with {c} connections for {:.1} s at {}{}",
        open.len(),
        duration.as_secs_f64(),
        if o.rate > 0.0 {
            format!("{} events/s", o.rate)
        } else {
            "max rate".into()
        },
        if batch > 1 {
            format!(", {batch} events per batch")
        } else {
            String::new()
        }
    ));
    if ctx.common.cluster.is_some() {
        let on: Vec<usize> = (0..ctx.nodes.len())
            .map(|k| open.iter().filter(|&&i| pool.slots[i].node == k).count())
            .collect();
        ctx.report.line(format!(
            "cluster: streams per node {on:?}; per-token requests via {}",
            via_words(ctx.common.via)
        ));
    }
    let redis_before = ctx.redis_stats().await;
    let cpu = ctx.cpu();
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let mut tasks = Vec::new();
    for k in 0..c {
        let share: Vec<Arc<Slot>> = open
            .iter()
            .skip(k)
            .step_by(c)
            .map(|&i| pool.slots[i].clone())
            .collect();
        let mut router = ctx.router();
        let remaining = remaining.clone();
        let pad = pad.clone();
        let nchan = ctx.common.target == crate::cli::TargetKind::Nchan;
        tasks.push(tokio::spawn(async move {
            let mut res = SenderResult::default();
            let mut next = rng(0x9E37_79B9_7F4A_7C15 ^ (k as u64 + 1));
            let mut tick = per_sender_interval.map(|iv| {
                let mut t = tokio::time::interval(iv);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            while Instant::now() < deadline {
                if let Some(t) = tick.as_mut() {
                    if tokio::time::timeout_at(deadline.into(), t.tick())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                let n = match remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                    (r > 0).then(|| r - r.min(batch as u64))
                }) {
                    Ok(r) => r.min(batch as u64) as usize,
                    Err(_) => break,
                };
                if batch == 1 || nchan {
                    for _ in 0..n {
                        let slot = &share[(next() % share.len() as u64) as usize];
                        let token = slot.token.get().expect("open_with_token filtered");
                        let seq = slot.next_seq.fetch_add(1, Ordering::Relaxed);
                        let body = send_body(token, "load", seq, now_us(), &pad);
                        let s = Instant::now();
                        let ans = router
                            .for_holder(slot.node)
                            .post("/internal/send", &body)
                            .await;
                        res.latency.record(s.elapsed().as_micros() as u64);
                        res.events += 1;
                        match ans {
                            Ok((200, _)) => {
                                slot.expected.fetch_add(1, Ordering::Relaxed);
                                res.ok += 1;
                            }
                            Ok((st, b)) => {
                                *res.failures
                                    .entry(format!("status {st}: {}", String::from_utf8_lossy(&b)))
                                    .or_default() += 1
                            }
                            Err(e) => *res.failures.entry(e).or_default() += 1,
                        }
                    }
                    continue;
                }
                // n sends, as one /internal/batch per node they are routed to (one batch without
                // --cluster or with a fixed --via); items for one token keep their seq order.
                let mut groups: Vec<Group> = Vec::new();
                let ts = now_us();
                for _ in 0..n {
                    let slot = &share[(next() % share.len() as u64) as usize];
                    let token = slot.token.get().expect("open_with_token filtered");
                    let seq = slot.next_seq.fetch_add(1, Ordering::Relaxed);
                    let node = router.route(slot.node);
                    let g = match groups.iter().position(|g| g.0 == node) {
                        Some(g) => g,
                        None => {
                            let mut body = Vec::with_capacity(n * 96 + 16);
                            body.extend_from_slice(br#"{"requests":["#);
                            groups.push((node, Vec::with_capacity(n), body));
                            groups.len() - 1
                        }
                    };
                    let (_, slots, body) = &mut groups[g];
                    if !slots.is_empty() {
                        body.push(b',');
                    }
                    body.extend_from_slice(br#"{"op":"send","#);
                    // send_body's object without its opening brace.
                    body.extend_from_slice(&send_body(token, "load", seq, ts, &pad)[1..]);
                    slots.push(slot);
                }
                for (node, slots, mut body) in groups {
                    body.extend_from_slice(b"]}");
                    let n = slots.len();
                    let s = Instant::now();
                    let ans = router.node(node).post("/internal/batch", &body).await;
                    res.latency.record(s.elapsed().as_micros() as u64);
                    res.events += n as u64;
                    let results = match &ans {
                        Ok((200, b)) => serde_json::from_slice::<serde_json::Value>(b)
                            .ok()
                            .and_then(|v| v["results"].as_array().cloned())
                            .filter(|r| r.len() == n),
                        _ => None,
                    };
                    let Some(results) = results else {
                        let why = match ans {
                            Ok((st, b)) => {
                                format!("batch status {st}: {}", String::from_utf8_lossy(&b))
                            }
                            Err(e) => e,
                        };
                        *res.failures.entry(why).or_default() += n as u64;
                        continue;
                    };
                    for (slot, r) in slots.iter().zip(&results) {
                        if r["status"] == 200 {
                            slot.expected.fetch_add(1, Ordering::Relaxed);
                            res.ok += 1;
                        } else {
                            *res.failures
                                .entry(format!("item status {}: {}", r["status"], r["body"]))
                                .or_default() += 1;
                        }
                    }
                }
            }
            res
        }));
    }
    let mut total = SenderResult::default();
    for t in tasks {
        // Each sender stops by `deadline` plus one request timeout; a join error is a panic.
        match t.await {
            Ok(r) => {
                total.events += r.events;
                total.ok += r.ok;
                for (k, v) in r.failures {
                    *total.failures.entry(k).or_default() += v;
                }
                total.latency.merge(&r.latency);
            }
            Err(e) => ctx.report.fail(format!("sender task failed: {e}")),
        }
    }
    let send_secs = t0.elapsed().as_secs_f64();
    let attempts = total.events;
    let requests = total.latency.count();
    let failed: u64 = total.failures.values().sum();
    // Deliveries: wait (bounded) until every accepted send arrived.
    let drain_deadline = Instant::now() + Duration::from_secs(ctx.common.drain_timeout);
    let (mut lost, mut extra);
    loop {
        (lost, extra) = (0u64, 0u64);
        for s in &pool.slots {
            let (e, r) = (
                s.expected.load(Ordering::Relaxed),
                s.received.load(Ordering::Relaxed),
            );
            lost += e.saturating_sub(r);
            extra += r.saturating_sub(e);
        }
        if lost == 0 || Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_s = cpu.elapsed();
    let sink = &ctx.sink;
    let delivered = sink.events.load(Ordering::Relaxed);
    let ooo = sink.out_of_order.load(Ordering::Relaxed);
    let unparsed = sink.unparsed.load(Ordering::Relaxed);
    let delivery = sink.latency.lock().unwrap().clone();
    ctx.report.line(format!(
        "sends: {attempts} in {send_secs:.2} s = {:.0}/s in {requests} requests; accepted (200) {} ; failed {failed}",
        attempts as f64 / send_secs.max(1e-9),
        total.ok
    ));
    for (k, v) in &total.failures {
        ctx.report.line(format!("  send failure {k}: {v}"));
    }
    ctx.report
        .line(format!("request latency:  {}", total.latency.human()));
    ctx.report
        .line(format!("delivery latency: {}", delivery.human()));
    ctx.report.line(format!(
        "delivered {delivered}; lost {lost}; duplicated/unexpected {extra}; out-of-order {ooo}; unparsed {unparsed}"
    ));
    if let Some(c) = cpu_s {
        ctx.report.line(format!(
            "{} CPU during sending and delivery: {c:.2} s = {:.1} µs per delivered event",
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
        "unicast",
        json!({
            "streams": open.len(), "concurrency": c, "rate_target": o.rate, "seconds": round(send_secs, 3),
            "sends": attempts, "requests": requests, "batch": batch, "accepted": total.ok, "failed": failed,
            "failures": total.failures, "sends_per_s": round(attempts as f64 / send_secs.max(1e-9), 1),
            "request_latency": total.latency.json(), "delivery_latency": delivery.json(),
            "delivered": delivered, "lost": lost, "unexpected": extra, "out_of_order": ooo, "unparsed": unparsed,
            "gateway_cpu_s": cpu_s.map(|c| round(c, 3)),
            "cpu_us_per_event": cpu_s.map(|c| round(c * 1e6 / delivered.max(1) as f64, 2)),
        }),
    );
    if failed > 0 {
        ctx.report.fail(format!("{failed} sends failed"));
    }
    if lost > 0 {
        ctx.report.fail(format!(
            "{lost} accepted events never delivered within {} s",
            ctx.common.drain_timeout
        ));
    }
    if ooo > 0 || extra > 0 {
        ctx.report.fail(format!(
            "{ooo} out-of-order and {extra} unexpected deliveries"
        ));
    }
    ctx.check_alive();
    ctx.close_and_audit(pool).await;
}
