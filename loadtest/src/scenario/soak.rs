//! `soak`: a long mixed run against a slow backend (every callback answered after a random delay),
//! bounded in time and count, with the gateway's PSS reported every `--report-every` seconds.
//!
//! - `-n` resident streams are held for the whole run. Even-numbered ones get per-token sends (C
//!   senders at `--send-rate`, payload `"<seq> <ts>"` per token); odd-numbered ones join channel
//!   `all` by `/internal/subscribe` and get one publish there every `1/--publish-rate` s (payload
//!   `"<n> <ts>"`, n = 1, 2, 3 … over the run). So every resident stream has one sequence to check:
//!   a gap is a lost event, a repeat or step back is out-of-order.
//! - `--subscribe-rate` cycles a second: a publish-half stream subscribes to `all` again (a no-op
//!   the gateway must accept) and to a scratch channel, gets a `probe` publish there (not counted),
//!   and unsubscribes from it.
//! - `--churners` loops open a stream, half subscribe it to `all`, hold it 0.1–3 s without reading,
//!   then leave; one in five is closed by the gateway instead (`close: true`), one in eight leaves
//!   100 ms after connecting, usually while its connect callback is still at the slow backend.
//!
//! At the end: every accepted event seen (by sequence numbers), every accepted token with exactly
//! one disconnect callback, and, once everything is closed and idle, PSS within 2x of its level
//! before the first stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::unicast::rng;
use super::Ctx;
use crate::report::{mib, round};
use crate::send::{publish_body, send_body, Sender};
use crate::stream::{open, source_for, OpenError, Slot, OPEN, PROBE_DATA};
use crate::sys::{now_us, pss_bytes, rss_bytes, tcp_stat};

pub struct Opts {
    pub minutes: f64,
    pub streams: usize,
    pub churners: usize,
    pub send_rate: f64,
    pub publish_rate: f64,
    pub subscribe_rate: f64,
    pub max_payload_bytes: usize,
    pub report_every: Duration,
}

/// Per-token senders; each owns the streams `i % SENDERS == k`, so sends to one token never overlap.
const SENDERS: usize = 4;
/// The channel the publish half of the resident streams joins.
const CHANNEL: &str = "all";
/// Scratch channels for subscribe churn.
const SCRATCH: u64 = 16;
/// Churn client ids start here, far from the resident pool's 0.. ids.
const FIRST_CHURN_CLIENT: u64 = 1 << 41;
/// How long a churned stream is held, ms.
const HOLD_MS: (u64, u64) = (100, 3000);
/// A client that leaves this soon after connecting (one churn in eight).
const ABANDON_AFTER: Duration = Duration::from_millis(100);
/// Once idle, PSS must come back within this factor of its level before the first stream …
const PSS_FACTOR: f64 = 2.0;
/// … within this long after the last disconnect callback.
const PSS_SETTLE: Duration = Duration::from_secs(60);

/// What the load tasks did, shared with the reporter.
#[derive(Default)]
struct Tally {
    sends: AtomicU64,
    publishes: AtomicU64,
    subscribe_cycles: AtomicU64,
    churn_opened: AtomicU64,
    churn_abandoned: AtomicU64,
    churn_server_closed: AtomicU64,
    /// Failed requests and opens, by kind.
    failures: Mutex<HashMap<String, u64>>,
}

impl Tally {
    fn fail(&self, what: impl Into<String>) {
        *self
            .failures
            .lock()
            .unwrap()
            .entry(what.into())
            .or_default() += 1;
    }

    fn failed(&self) -> u64 {
        self.failures.lock().unwrap().values().sum()
    }
}

/// POSTs `body` to `path`; true on 200, else the failure is tallied under `what`.
async fn post_ok(sender: &mut Sender, tally: &Tally, what: &str, path: &str, body: &[u8]) -> bool {
    match sender.post(path, body).await {
        Ok((200, _)) => true,
        Ok((st, b)) => {
            tally.fail(format!(
                "{what}: status {st} {}",
                String::from_utf8_lossy(&b)
            ));
            false
        }
        Err(e) => {
            tally.fail(format!("{what}: {e}"));
            false
        }
    }
}

fn padding(len: usize) -> String {
    let mut s = String::with_capacity(len + 1);
    s.push(' ');
    s.extend(std::iter::repeat_n('x', len));
    s
}

pub async fn run(ctx: &mut Ctx, o: Opts) {
    let pids = ctx.gateway_pids();
    // Every gateway's Pss and Rss, summed (one gateway: its own).
    let sum = |f: fn(u32) -> std::io::Result<u64>| {
        let pids = pids.clone();
        move || {
            pids.as_ref()?
                .iter()
                .map(|&p| f(p).ok())
                .sum::<Option<u64>>()
        }
    };
    let (pss, rss_all) = (sum(pss_bytes), sum(rss_bytes));
    let start_pss = pss();
    let pool = ctx.open_streams(o.streams).await;
    let open_idx = pool.open_with_token();
    let slots: Vec<Arc<Slot>> = open_idx.iter().map(|&i| pool.slots[i].clone()).collect();
    let (uni, mut publ): (Vec<_>, Vec<_>) = slots
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let uni: Vec<Arc<Slot>> = uni.into_iter().map(|(_, s)| s).collect();
    let tally = Arc::new(Tally::default());
    // The publish half joins `all` by subscribe (the backend's connect answer names no channel).
    let mut control = ctx.sender();
    let mut joined = Vec::new();
    for (_, slot) in publ.drain(..) {
        let token = slot.token.get().expect("open_with_token filtered");
        let body = json!({"token": token, "channels": [CHANNEL]}).to_string();
        if post_ok(
            &mut control,
            &tally,
            "subscribe",
            "/internal/subscribe",
            body.as_bytes(),
        )
        .await
        {
            joined.push(slot);
        }
    }
    let publ = Arc::new(joined);
    if uni.is_empty() || publ.is_empty() {
        ctx.report
            .fail("too few resident streams to send and publish to");
        ctx.close_and_audit(pool).await;
        return;
    }
    let run_for = Duration::from_secs_f64(o.minutes.max(0.0) * 60.0);
    ctx.report.line(format!(
        "soak for {:.1} min: {} streams get per-token sends ({} /s over {SENDERS} senders), {} are in \
         channel {CHANNEL:?} ({} publishes/s), {} subscribe cycles/s, {} churn loops; backend answers \
         every callback after a random delay; payload padding 0..={} B",
        o.minutes,
        uni.len(),
        o.send_rate,
        publ.len(),
        o.publish_rate,
        o.subscribe_rate,
        o.churners,
        o.max_payload_bytes
    ));
    ctx.report.line(format!(
        "start: gateway Pss {} before any stream, {} with the resident streams",
        start_pss.map_or("n/a".into(), mib),
        pss().map_or("n/a".into(), mib)
    ));
    let cpu = ctx.cpu();
    let t0 = Instant::now();
    let deadline = t0 + run_for;
    let mut tasks = Vec::new();

    // Per-token sends.
    for k in 0..SENDERS {
        let share: Vec<Arc<Slot>> = uni.iter().skip(k).step_by(SENDERS).cloned().collect();
        if share.is_empty() {
            continue;
        }
        let (mut sender, tally) = (ctx.sender(), tally.clone());
        let interval = Duration::from_secs_f64(SENDERS as f64 / o.send_rate.max(0.001));
        let max_pad = o.max_payload_bytes;
        tasks.push(tokio::spawn(async move {
            let mut next = rng(0x5EED_0000 + k as u64);
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while tokio::time::timeout_at(deadline.into(), tick.tick())
                .await
                .is_ok()
            {
                let slot = &share[(next() % share.len() as u64) as usize];
                let token = slot.token.get().expect("open_with_token filtered");
                let pad = padding((next() % (max_pad as u64 + 1)) as usize);
                let seq = slot.next_seq.fetch_add(1, Relaxed);
                let body = send_body(token, "soak", seq, now_us(), &pad);
                if post_ok(&mut sender, &tally, "send", "/internal/send", &body).await {
                    slot.expected.fetch_add(1, Relaxed);
                    tally.sends.fetch_add(1, Relaxed);
                }
            }
        }));
    }

    // Publishes to `all`, numbered 1, 2, 3 …: every publish-half stream must see each once, in order.
    {
        let (mut sender, tally, members) = (ctx.sender(), tally.clone(), publ.len() as u64);
        let interval = Duration::from_secs_f64(1.0 / o.publish_rate.max(0.001));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0;
            while tokio::time::timeout_at(deadline.into(), tick.tick())
                .await
                .is_ok()
            {
                n += 1;
                let body = publish_body(CHANNEL, "soak", n, now_us());
                match sender.post("/internal/publish", &body).await {
                    Ok((200, b)) => {
                        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                        let delivered = v["delivered"].as_u64().unwrap_or(0);
                        // Churned streams may be in the channel too: at least every member.
                        if delivered < members {
                            tally
                                .fail(format!("publish delivered {delivered} < {members} members"));
                        }
                        tally.publishes.fetch_add(1, Relaxed);
                    }
                    Ok((st, b)) => tally.fail(format!(
                        "publish: status {st} {}",
                        String::from_utf8_lossy(&b)
                    )),
                    Err(e) => tally.fail(format!("publish: {e}")),
                }
            }
        }));
    }

    // Subscribe churn on the publish half: rejoin `all` (a no-op), join a scratch channel, get a
    // probe there, leave it.
    {
        let (mut sender, tally, members) = (ctx.sender(), tally.clone(), publ.clone());
        let interval = Duration::from_secs_f64(1.0 / o.subscribe_rate.max(0.001));
        tasks.push(tokio::spawn(async move {
            let mut next = rng(0x5AB5);
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while tokio::time::timeout_at(deadline.into(), tick.tick())
                .await
                .is_ok()
            {
                let r = next();
                let token = members[(r % members.len() as u64) as usize]
                    .token
                    .get()
                    .expect("open_with_token filtered");
                let scratch = format!("scratch.{}", (r >> 32) % SCRATCH);
                let join = json!({"token": token, "channels": [CHANNEL, scratch]}).to_string();
                let probe = json!({"channel": scratch, "event": {"data": PROBE_DATA}}).to_string();
                let leave = json!({"token": token, "channels": [scratch]}).to_string();
                let ok = post_ok(
                    &mut sender,
                    &tally,
                    "subscribe",
                    "/internal/subscribe",
                    join.as_bytes(),
                )
                .await
                    && post_ok(
                        &mut sender,
                        &tally,
                        "probe publish",
                        "/internal/publish",
                        probe.as_bytes(),
                    )
                    .await
                    && post_ok(
                        &mut sender,
                        &tally,
                        "unsubscribe",
                        "/internal/unsubscribe",
                        leave.as_bytes(),
                    )
                    .await;
                if ok {
                    tally.subscribe_cycles.fetch_add(1, Relaxed);
                }
            }
        }));
    }

    // Connect churn.
    let next_client = Arc::new(AtomicU64::new(FIRST_CHURN_CLIENT));
    for k in 0..o.churners {
        let (tally, backend, next_client) =
            (tally.clone(), ctx.backend.clone(), next_client.clone());
        let (dsts, path, sources) = (ctx.publics(), ctx.common.path.clone(), ctx.common.sources);
        let head_timeout = Duration::from_secs(ctx.common.head_timeout);
        let mut sender = ctx.sender();
        tasks.push(tokio::spawn(async move {
            let mut next = rng(0xC4A2 + k as u64);
            while Instant::now() < deadline {
                let r = next();
                let client = next_client.fetch_add(1, Relaxed);
                let abandon = r.is_multiple_of(8);
                let wait = if abandon { ABANDON_AFTER } else { head_timeout };
                let src = source_for(client, sources);
                let dst = dsts[client as usize % dsts.len()];
                let opened = match open(client, src, dst, &path, wait).await {
                    Ok(o) => o,
                    Err(OpenError::Timeout) if abandon => {
                        tally.churn_abandoned.fetch_add(1, Relaxed);
                        continue;
                    }
                    Err(e) => {
                        tally.fail(format!("churn open: {e}"));
                        // A refusal must not turn into a busy loop.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                tally.churn_opened.fetch_add(1, Relaxed);
                let Some(token) = backend.token_for(client) else {
                    tally.fail("churn: 200 without a connect callback");
                    continue;
                };
                if (r >> 8).is_multiple_of(2) {
                    let body = json!({"token": token, "channels": [CHANNEL]}).to_string();
                    post_ok(
                        &mut sender,
                        &tally,
                        "churn subscribe",
                        "/internal/subscribe",
                        body.as_bytes(),
                    )
                    .await;
                }
                let hold = HOLD_MS.0 + (r >> 16) % (HOLD_MS.1 - HOLD_MS.0);
                tokio::time::sleep(Duration::from_millis(hold)).await;
                if (r >> 40).is_multiple_of(5) {
                    let body = json!({"token": token, "close": true}).to_string();
                    if post_ok(
                        &mut sender,
                        &tally,
                        "churn close",
                        "/internal/send",
                        body.as_bytes(),
                    )
                    .await
                    {
                        tally.churn_server_closed.fetch_add(1, Relaxed);
                    }
                }
                drop(opened);
            }
        }));
    }

    // Progress, every `report_every` until the deadline.
    let mut rows = Vec::new();
    let mut at = t0;
    loop {
        at += o.report_every;
        if at > deadline {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let (p, rss) = (pss(), rss_all());
        let resident = slots
            .iter()
            .filter(|s| s.state.load(Relaxed) == OPEN)
            .count();
        let row = json!({
            "minute": round(t0.elapsed().as_secs_f64() / 60.0, 2),
            "pss_bytes": p, "rss_bytes": rss, "gateway_cpu_s": cpu.elapsed().map(|c| round(c, 2)),
            "resident_open": resident,
            "sends": tally.sends.load(Relaxed), "publishes": tally.publishes.load(Relaxed),
            "subscribe_cycles": tally.subscribe_cycles.load(Relaxed),
            "churn_opened": tally.churn_opened.load(Relaxed),
            "churn_abandoned": tally.churn_abandoned.load(Relaxed),
            "connect_callbacks": ctx.backend.connects.load(Relaxed),
            "disconnect_callbacks": ctx.backend.disconnects.load(Relaxed),
            "events_delivered": ctx.sink.events.load(Relaxed),
            "gaps": ctx.sink.gaps.load(Relaxed), "out_of_order": ctx.sink.out_of_order.load(Relaxed),
            "failed_requests": tally.failed(),
            "tcp_inuse": tcp_stat().ok().map(|t| t.inuse),
        });
        ctx.report.line(format!(
            "t={:>5.1} min  Pss {}  Rss {}  cpu {:.1} s  resident {resident}  sends {}  publishes {}  \
             sub-cycles {}  churn opens {} (+{} abandoned)  callbacks {}/{}  delivered {}  gaps {}  \
             out-of-order {}  failed {}",
            row["minute"].as_f64().unwrap_or(0.0),
            p.map_or("n/a".into(), mib),
            rss.map_or("n/a".into(), mib),
            cpu.elapsed().unwrap_or(0.0),
            row["sends"], row["publishes"], row["subscribe_cycles"], row["churn_opened"],
            row["churn_abandoned"], row["connect_callbacks"], row["disconnect_callbacks"],
            row["events_delivered"], row["gaps"], row["out_of_order"], row["failed_requests"],
        ));
        rows.push(row);
        if !ctx.check_alive() {
            break;
        }
    }
    for t in tasks {
        // Every task stops at the deadline plus at most one request timeout or one hold.
        if let Err(e) = t.await {
            ctx.report.fail(format!("load task failed: {e}"));
        }
    }
    let load_secs = t0.elapsed().as_secs_f64();

    // Every accepted event must arrive: sends by token, publishes on every member.
    let publishes = tally.publishes.load(Relaxed);
    for s in publ.iter() {
        s.expected.store(publishes, Relaxed);
    }
    let drain_deadline = Instant::now() + Duration::from_secs(ctx.common.drain_timeout);
    let (mut lost, mut extra);
    loop {
        (lost, extra) = (0u64, 0u64);
        for s in &slots {
            let (e, r) = (s.expected.load(Relaxed), s.received.load(Relaxed));
            lost += e.saturating_sub(r);
            extra += r.saturating_sub(e);
        }
        if lost == 0 || Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gaps = ctx.sink.gaps.load(Relaxed);
    let ooo = ctx.sink.out_of_order.load(Relaxed);
    let cpu_s = cpu.elapsed();
    let failures = tally.failures.lock().unwrap().clone();
    ctx.report.line(format!(
        "load for {load_secs:.0} s: sends {}, publishes {publishes} (to {} members each), subscribe \
         cycles {}, churn opens {} (+{} abandoned, {} closed by the gateway), failed requests {}",
        tally.sends.load(Relaxed),
        publ.len(),
        tally.subscribe_cycles.load(Relaxed),
        tally.churn_opened.load(Relaxed),
        tally.churn_abandoned.load(Relaxed),
        tally.churn_server_closed.load(Relaxed),
        tally.failed()
    ));
    for (k, v) in &failures {
        ctx.report.line(format!("  failure {k}: {v}"));
    }
    ctx.report.line(format!(
        "events: expected {} delivered {}; lost {lost} (sequence gaps {gaps}), unexpected {extra}, \
         out-of-order {ooo}",
        slots.iter().map(|s| s.expected.load(Relaxed)).sum::<u64>(),
        slots.iter().map(|s| s.received.load(Relaxed)).sum::<u64>(),
    ));
    ctx.check_alive();
    ctx.close_and_audit(pool).await;

    // Idle: PSS must come back near where it started.
    let limit = start_pss.map(|s| (s as f64 * PSS_FACTOR) as u64);
    let settle_from = Instant::now();
    let mut end_pss = pss();
    while let (Some(p), Some(l)) = (end_pss, limit) {
        if p <= l || settle_from.elapsed() >= PSS_SETTLE {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        end_pss = pss();
    }
    ctx.report.line(format!(
        "idle after the run: Pss {} after {:.0} s ({}x the {} before the first stream; bound {PSS_FACTOR}x)",
        end_pss.map_or("n/a".into(), mib),
        settle_from.elapsed().as_secs_f64(),
        match (end_pss, start_pss) {
            (Some(e), Some(s)) => format!("{:.2}", e as f64 / s as f64),
            _ => "n/a".into(),
        },
        start_pss.map_or("n/a".into(), mib),
    ));
    ctx.report.set(
        "soak",
        json!({
            "minutes": o.minutes, "resident": slots.len(), "unicast_streams": uni.len(),
            "channel_members": publ.len(), "sends": tally.sends.load(Relaxed), "publishes": publishes,
            "subscribe_cycles": tally.subscribe_cycles.load(Relaxed),
            "churn_opened": tally.churn_opened.load(Relaxed),
            "churn_abandoned": tally.churn_abandoned.load(Relaxed),
            "churn_server_closed": tally.churn_server_closed.load(Relaxed),
            "failures": failures, "lost": lost, "gaps": gaps, "unexpected": extra, "out_of_order": ooo,
            "gateway_cpu_s": cpu_s.map(|c| round(c, 2)),
            "start_pss_bytes": start_pss, "end_idle_pss_bytes": end_pss, "per_interval": rows,
        }),
    );
    if tally.failed() > 0 {
        ctx.report
            .fail(format!("{} requests or opens failed", tally.failed()));
    }
    if lost > 0 || gaps > 0 {
        ctx.report
            .fail(format!("{lost} events lost ({gaps} sequence gaps)"));
    }
    if ooo > 0 || extra > 0 {
        ctx.report.fail(format!(
            "{ooo} out-of-order and {extra} unexpected deliveries"
        ));
    }
    if let (Some(e), Some(l)) = (end_pss, limit) {
        if e > l {
            ctx.report.fail(format!(
                "idle Pss {} is over {PSS_FACTOR}x the start ({}) {} s after the run",
                mib(e),
                mib(start_pss.unwrap_or(0)),
                PSS_SETTLE.as_secs()
            ));
        }
    }
}
