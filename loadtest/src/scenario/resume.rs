//! `resume`: a reconnect storm with `Last-Event-ID` (PROTOCOL §11). `-n` streams in `--channels`
//! channels see `--before` events live; then every stream drops at once; while they are away each
//! misses `--missed` events; then all reconnect within `--spread-ms`, each with the id of the last
//! event it saw, as a browser's `EventSource` does. Measured: the time until every stream is live
//! again (its replay complete and a live probe event received), events lost or received twice,
//! and the gateway's CPU per replayed event over the storm.
//!
//! Channels: with `--join all` every stream is in every channel and the events go round-robin over
//! them, each with the next number of one global sequence; with `--join one` stream `c` is in
//! channel `c % channels` only and every channel gets each event number. Either way a stream
//! must see the numbers 1, 2, 3, ... exactly once, in order, which checks every channel's sequence
//! (an event of one channel missing, repeated or out of place breaks it).
//!
//! `--without-id` reconnects without the header (the events missed are then missed by design): the
//! same storm's cost without the replay, so the difference is what replaying costs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::Ctx;
use crate::backend::Plan;
use crate::hist::{fmt_us, Histogram};
use crate::report::{mib, round};
use crate::send::Sender;
use crate::stream::{Pool, OPEN};
use crate::sys::{cpu_seconds, listen_drops, now_us};

pub struct Opts {
    pub streams: usize,
    pub plan: Plan,
    pub before: u64,
    pub missed: u64,
    pub spread: Duration,
    /// Opens in flight at once during the storm (0: no bound beyond the spread).
    pub reconnect_concurrency: usize,
    pub without_id: bool,
    /// Publish one more event every this often while the streams reconnect (0: none).
    pub publish_during: Duration,
    pub storm_timeout: Duration,
}

/// Publishes "the next event every stream sees": with every stream in every channel, one publish
/// to the next channel round-robin carrying the next global number; with one channel per stream,
/// one publish per channel, all carrying the same next number.
struct Publisher {
    sender: Sender,
    plan: Plan,
    /// The number of the last event published (what every stream has seen once it is current).
    seq: u64,
    publishes: u64,
}

impl Publisher {
    /// Publishes event `seq + 1`; returns the streams it was delivered to (summed over channels).
    async fn next(&mut self) -> Result<u64, String> {
        self.seq += 1;
        let seq = self.seq;
        let ts = now_us();
        let channels: Vec<usize> = if self.plan.all {
            vec![(seq as usize - 1) % self.plan.count.max(1)]
        } else {
            (0..self.plan.count.max(1)).collect()
        };
        let mut delivered = 0;
        for k in channels {
            let name = self.plan.name(k);
            let body = json!({"channel": name, "event": {"name": "h", "data": format!("{seq} {ts} {name}")}})
                .to_string();
            self.publishes += 1;
            match self.sender.post("/internal/publish", body.as_bytes()).await {
                Ok((200, b)) => {
                    let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                    delivered += v["delivered"].as_u64().unwrap_or(0);
                }
                Ok((st, b)) => {
                    return Err(format!(
                        "publish {seq} to {name}: status {st}: {}",
                        String::from_utf8_lossy(&b)
                    ))
                }
                Err(e) => return Err(format!("publish {seq} to {name}: {e}")),
            }
        }
        Ok(delivered)
    }
}

/// Waits until every slot of `pool` saw event `seq` (or `deadline`); returns how many did not.
async fn wait_all_saw(pool: &Pool, seq: u64, deadline: Instant) -> usize {
    loop {
        let behind = pool
            .slots
            .iter()
            .filter(|s| s.last_seq.load(Ordering::Relaxed) < seq)
            .count();
        if behind == 0 || Instant::now() >= deadline {
            return behind;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `sse_gateway_resumes_total` by result: (complete, gap).
async fn resumes(ctx: &Ctx) -> (f64, f64) {
    let get = |v: &Option<Vec<(String, f64)>>, r: &str| {
        v.as_ref()
            .and_then(|v| {
                v.iter()
                    .find(|(s, _)| s.contains(&format!("result=\"{r}\"")))
                    .map(|(_, x)| *x)
            })
            .unwrap_or(0.0)
    };
    let v = ctx.metric("sse_gateway_resumes_total").await;
    (get(&v, "complete"), get(&v, "gap"))
}

pub async fn run(ctx: &mut Ctx, o: Opts) {
    if o.without_id && !o.publish_during.is_zero() {
        ctx.report.fail(
            "--publish-during-ms with --without-id: streams that reconnect after such an event miss it by design; use one or the other",
        );
        return;
    }
    let n = ctx.cap(o.streams);
    let sink = ctx.sink.clone();
    let mut publisher = Publisher {
        sender: ctx.sender(),
        plan: o.plan.clone(),
        seq: 0,
        publishes: 0,
    };
    ctx.report.line(format!(
        "resume: {n} streams, {} channels {}, {} events seen live, {} missed while away, reconnect {} within {} ms",
        o.plan.count,
        if o.plan.all { "(every stream in all of them)" } else { "(each stream in one)" },
        o.before,
        o.missed,
        if o.without_id { "WITHOUT Last-Event-ID" } else { "with Last-Event-ID" },
        o.spread.as_millis()
    ));

    // 1. Streams, live, that see `before` events.
    let mut pool = ctx.pool_with(true, ctx.common.open_concurrency);
    let r = pool.grow(n, ctx.open_timeout()).await;
    ctx.report.line(format!(
        "opened {} of {n} streams in {:.2} s, {} failed",
        r.established,
        r.elapsed.as_secs_f64(),
        r.failed
    ));
    if r.established < n as u64 {
        ctx.report.fail(format!(
            "{} of {n} streams did not open ({} failed, {} pending)",
            n as u64 - r.established,
            r.failed,
            r.pending
        ));
        ctx.close_and_audit(pool).await;
        return;
    }
    let mut live_delivered = 0;
    for _ in 0..o.before {
        match publisher.next().await {
            Ok(d) => live_delivered += d,
            Err(e) => ctx.report.fail(e),
        }
    }
    let behind = wait_all_saw(&pool, publisher.seq, Instant::now() + o.storm_timeout).await;
    if behind > 0 {
        ctx.report.missed(format!(
            "{behind} of {n} streams did not see the {} live events within {:?}",
            o.before, o.storm_timeout
        ));
    }
    let seen_before = publisher.seq;
    // What each stream would reconnect with: the number and id of the last event it saw.
    let saved: Vec<(u64, String)> = pool
        .slots
        .iter()
        .map(|s| {
            (
                s.last_seq.load(Ordering::Relaxed),
                String::from_utf8_lossy(&s.last_id.lock().unwrap()).into_owned(),
            )
        })
        .collect();
    let without_ids = saved.iter().filter(|(_, id)| id.is_empty()).count();
    ctx.report.line(format!(
        "before: {} publishes, {live_delivered} deliveries; every stream saw events 1..={seen_before}; last id e.g. {:?}",
        publisher.publishes,
        saved.first().map(|(_, id)| id.as_str()).unwrap_or("")
    ));
    if without_ids > 0 && !o.without_id {
        ctx.report.fail(format!(
            "{without_ids} streams saw no event id: is history on (--gateway-env HISTORY_SIZE=100)?"
        ));
        ctx.close_and_audit(pool).await;
        return;
    }

    // 2. All drop at once; the gateway reports each one to the backend.
    let t_drop = Instant::now();
    pool.close_all();
    drop(pool);
    let (audit, done) = ctx
        .backend
        .wait_disconnects(Duration::from_secs(ctx.common.drain_timeout))
        .await;
    ctx.report.line(format!(
        "dropped all {n}: every disconnect callback in {:.2} s ({})",
        t_drop.elapsed().as_secs_f64(),
        if done { "complete" } else { "INCOMPLETE" }
    ));
    if !done {
        ctx.report.missed(format!(
            "{} tokens without a disconnect callback after the drop",
            audit.without_disconnect
        ));
    }

    // 3. Events published while they are away.
    let mut away_delivered = 0;
    let publishes0 = publisher.publishes;
    for _ in 0..o.missed {
        match publisher.next().await {
            Ok(d) => away_delivered += d,
            Err(e) => ctx.report.fail(e),
        }
    }
    let missed_through = publisher.seq;
    let publishes_away = publisher.publishes - publishes0;
    let history_bytes = ctx.metric_value("sse_gateway_history_bytes").await;
    ctx.report.line(format!(
        "away: {} publishes (events {}..={missed_through}), delivered to {away_delivered} streams; history {}",
        publishes_away,
        seen_before + 1,
        history_bytes.map_or("n/a".to_owned(), |b| format!("{b:.0} B ({})", mib(b as u64)))
    ));

    // 4. The storm: every stream reconnects within `spread`, with the id it last saw.
    let resumes0 = resumes(ctx).await;
    let replay_target = if o.without_id { 0 } else { missed_through };
    let events0 = sink.events.load(Ordering::Relaxed);
    let gaps0 = sink.gaps.load(Ordering::Relaxed);
    let ooo0 = sink.out_of_order.load(Ordering::Relaxed);
    *sink.heads.lock().unwrap() = Histogram::default();
    *sink.resumed_at.lock().unwrap() = Histogram::default();
    let drops0 = listen_drops().ok();
    let self0 = cpu_seconds(std::process::id()).ok();
    let cpu = ctx.cpu();
    let t0 = Instant::now();
    let t0_us = now_us();
    sink.resume_t0_us.store(t0_us, Ordering::Relaxed);
    sink.resume_target.store(replay_target, Ordering::Relaxed);
    // Optional publishes while the storm is under way: they race each stream's join and replay.
    let stop = Arc::new(AtomicBool::new(false));
    let during = (!o.publish_during.is_zero()).then(|| {
        let (stop, every) = (stop.clone(), o.publish_during);
        let mut p = std::mem::replace(
            &mut publisher,
            Publisher {
                sender: ctx.sender(),
                plan: o.plan.clone(),
                seq: 0,
                publishes: 0,
            },
        );
        tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Err(e) = p.next().await {
                    errors.push(e);
                }
            }
            (p, errors)
        })
    });
    let concurrency = if o.reconnect_concurrency == 0 {
        n
    } else {
        o.reconnect_concurrency
    };
    let mut storm = ctx.pool_with(true, concurrency);
    let without_id = o.without_id;
    let r = storm
        .grow_with(n, o.storm_timeout, o.spread, |i, slot| {
            let (seq, id) = &saved[i];
            if without_id {
                // Whatever was published while away is missed by design.
                slot.last_seq.store(missed_through, Ordering::Relaxed);
            } else {
                slot.last_seq.store(*seq, Ordering::Relaxed);
                let _ = slot.resume_from.set(id.clone());
            }
        })
        .await;
    let heads_at = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    if let Some(task) = during {
        match task.await {
            Ok((p, errors)) => {
                publisher = p;
                for e in errors {
                    ctx.report.fail(e);
                }
            }
            Err(e) => ctx.report.fail(format!("publisher task: {e}")),
        }
    }
    let during_events = publisher.seq - missed_through;
    if r.established < n as u64 {
        ctx.report.fail(format!(
            "storm: {} of {n} reconnects failed or still pending after {:?} ({} failed, {} pending)",
            n as u64 - r.established,
            o.storm_timeout,
            r.failed,
            r.pending
        ));
    }
    // The live probe: every stream accepted (its replay already queued), so it is a live event.
    let probe = publisher.seq + 1;
    sink.round_delivered.store(0, Ordering::Relaxed);
    sink.round_last_us.store(0, Ordering::Relaxed);
    sink.round.store(probe, Ordering::Relaxed);
    let probe_delivered = match publisher.next().await {
        Ok(d) => d,
        Err(e) => {
            ctx.report.fail(e);
            0
        }
    };
    let deadline = t0 + o.storm_timeout;
    let open = r.established;
    while sink.round_delivered.load(Ordering::Relaxed) < open && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let all_live = sink.round_delivered.load(Ordering::Relaxed) >= n as u64;
    let cpu_s = cpu.elapsed();
    let self_cpu = self0.and_then(|c0| cpu_seconds(std::process::id()).ok().map(|c| c - c0));
    let wall = t0.elapsed();
    let drops = drops0.and_then(|(o0, d0)| listen_drops().ok().map(|(o1, d1)| (o1 - o0, d1 - d0)));
    let live_us = sink
        .round_last_us
        .load(Ordering::Relaxed)
        .saturating_sub(t0_us);
    if !all_live {
        ctx.report.missed(format!(
            "{} of {n} streams live (probe received) after {:?}",
            sink.round_delivered.load(Ordering::Relaxed),
            o.storm_timeout
        ));
    }
    // A moment for anything duplicated behind the probe to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sink.resume_target.store(0, Ordering::Relaxed);
    let storm_events = sink.events.load(Ordering::Relaxed) - events0;
    let replayed = storm_events.saturating_sub(sink.round_delivered.load(Ordering::Relaxed));
    let expected_replay = if o.without_id {
        0
    } else {
        n as u64 * (missed_through - seen_before)
    };
    let lost = sink.gaps.load(Ordering::Relaxed) - gaps0;
    let dup = sink.out_of_order.load(Ordering::Relaxed) - ooo0;
    let gap_events = sink.gap_events.load(Ordering::Relaxed);
    let behind: Vec<usize> = (0..storm.slots.len())
        .filter(|&i| storm.slots[i].last_seq.load(Ordering::Relaxed) != probe)
        .collect();
    let still_open = storm
        .slots
        .iter()
        .filter(|s| s.state.load(Ordering::Relaxed) == OPEN)
        .count();
    let resumes1 = resumes(ctx).await;
    let (complete, gap) = (resumes1.0 - resumes0.0, resumes1.1 - resumes0.1);
    let heads = sink.heads.lock().unwrap().clone();
    let resumed_at = sink.resumed_at.lock().unwrap().clone();

    ctx.report.line(format!(
        "storm: {} of {n} reconnected, last response head after {}{}",
        r.established,
        fmt_us(heads_at.as_micros() as u64),
        if during_events > 0 {
            format!(", {during_events} events published meanwhile")
        } else {
            String::new()
        }
    ));
    ctx.report
        .line(format!("  time to response head: {}", heads.human()));
    if !o.without_id {
        ctx.report.line(format!(
            "  replay complete (event {missed_through} received), from the storm's start: {}",
            resumed_at.human()
        ));
    }
    ctx.report.line(format!(
        "  ALL LIVE (live probe {probe} received by {} of {n}, delivered {probe_delivered}) {} after the storm's start",
        sink.round_delivered.load(Ordering::Relaxed),
        fmt_us(live_us)
    ));
    ctx.report.line(format!(
        "  events received in the storm: {storm_events} = {replayed} replayed/caught up (expected {}) + probes; lost {lost}, duplicated or out of order {dup}, gateway.gap events {gap_events}; streams not at event {probe}: {}; still open {still_open}",
        expected_replay + n as u64 * during_events,
        behind.len()
    ));
    ctx.report.line(format!(
        "  sse_gateway_resumes_total during the storm: complete {complete}, gap {gap}"
    ));
    let per_replayed = |c: f64| (replayed > 0).then(|| c * 1e6 / replayed as f64);
    if let Some(c) = cpu_s {
        ctx.report.line(format!(
            "  gateway CPU over the storm ({:.2} s wall, start to all live): {c:.2} s = {} per replayed event, {:.1} µs per reconnect; sse-load's own CPU {}",
            wall.as_secs_f64(),
            per_replayed(c).map_or("n/a".to_owned(), |u| format!("{u:.2} µs")),
            c * 1e6 / n.max(1) as f64,
            self_cpu.map_or("n/a".to_owned(), |s| format!("{s:.2} s"))
        ));
    }
    if let Some((ov, dr)) = drops {
        ctx.report.line(format!(
            "  accept queue: ListenOverflows +{ov}, ListenDrops +{dr} (machine-wide)"
        ));
    }
    ctx.report.set(
        "resume",
        json!({
            "streams": n, "channels": o.plan.count, "join": if o.plan.all { "all" } else { "one" },
            "before": o.before, "missed": o.missed, "with_id": !o.without_id,
            "spread_ms": o.spread.as_millis() as u64, "reconnect_concurrency": concurrency,
            "publishes_before": publishes0, "publishes_away": publishes_away,
            "events_during_storm": during_events,
            "history_bytes": history_bytes,
            "reconnected": r.established, "reconnect_failed": r.failed,
            "heads_done_us": heads_at.as_micros() as u64,
            "time_to_head": heads.json(), "replay_complete_at": resumed_at.json(),
            "all_live_us": live_us, "all_live": all_live,
            "probe_received": sink.round_delivered.load(Ordering::Relaxed),
            "storm_events": storm_events, "replayed": replayed, "expected_replay": expected_replay,
            "lost": lost, "duplicated": dup, "gap_events": gap_events, "not_current": behind.len(),
            "resumes_complete": complete, "resumes_gap": gap,
            "gateway_cpu_s": cpu_s.map(|c| round(c, 3)),
            "cpu_us_per_replayed": cpu_s.and_then(per_replayed).map(|u| round(u, 3)),
            "cpu_us_per_reconnect": cpu_s.map(|c| round(c * 1e6 / n.max(1) as f64, 2)),
            "load_cpu_s": self_cpu.map(|c| round(c, 3)),
            "wall_s": round(wall.as_secs_f64(), 3),
            "listen_overflows": drops.map(|d| d.0), "listen_drops": drops.map(|d| d.1),
        }),
    );
    if lost > 0 {
        ctx.report
            .fail(format!("{lost} events lost across the reconnect"));
    }
    if dup > 0 {
        ctx.report
            .fail(format!("{dup} events received twice or out of order"));
    }
    if !behind.is_empty() && all_live {
        ctx.report.fail(format!(
            "{} streams are not at the last event {probe} (first: stream {})",
            behind.len(),
            behind[0]
        ));
    }
    if !o.without_id {
        if gap_events > 0 {
            ctx.report.fail(format!(
                "{gap_events} gateway.gap events: nothing should be a gap"
            ));
        }
        if replayed < expected_replay {
            ctx.report.fail(format!(
                "{replayed} events replayed, {expected_replay} expected"
            ));
        }
        if complete < n as f64 || gap > 0.0 {
            ctx.report.fail(format!(
                "sse_gateway_resumes_total rose by complete {complete}, gap {gap}; want complete {n}, gap 0"
            ));
        }
    }
    if probe_delivered != n as u64 {
        ctx.report.fail(format!(
            "the probe publish answered delivered={probe_delivered}, {n} streams"
        ));
    }
    ctx.check_alive();
    ctx.close_and_audit(storm).await;
}
