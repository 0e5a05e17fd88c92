//! `history-memory`: does `HISTORY_MAX_BYTES` bound the gateway's real memory (PROTOCOL §11.1)?
//! Publishes one event of `--event-bytes` to each of `--channels` distinct channels (`m0`, `m1`,
//! ...; `--passes` times over), through `POST /internal/batch` (PROTOCOL §12) for speed, to a
//! gateway with history on and no stream at all: every event is kept and nothing is delivered.
//! Samples `sse_gateway_history_bytes` and the gateway's Pss, RSS and peak RSS (`VmHWM`) before,
//! while publishing and after; checks the gauge never passes the bound, and reports how much the
//! RSS grew against what the gauge counts (the difference is the allocator's and the containers'
//! overhead beyond the gateway's fixed estimate per entry and per channel). With `--expire-wait S`
//! (and a short `HISTORY_TTL_SECONDS`) it then waits for the history to expire and reads the
//! memory once more.

use std::time::{Duration, Instant};

use serde_json::json;

use super::Ctx;
use crate::report::{mib, round};
use crate::sys::{hwm_bytes, pss_bytes, rss_bytes};

pub struct Opts {
    pub channels: usize,
    pub event_bytes: usize,
    pub batch: usize,
    pub passes: u32,
    pub samples: usize,
    pub settle: Duration,
    pub expire_wait: Duration,
}

/// The gateway's defaults (README Configuration) for what `--gateway-env` does not set.
const DEFAULT_MAX_BYTES: u64 = 64 << 20;
const DEFAULT_MAX_SEND_BYTES: usize = 1 << 20;
const DEFAULT_MAX_BATCH_ITEMS: usize = 1000;
/// What the gateway counts per kept entry and per channel besides the frame and the name, and
/// the frame as a quarter more than its length (`src/history/memory.rs`: `ENTRY_OVERHEAD`,
/// `CHANNEL_OVERHEAD`, `frame_cost`).
const ENTRY_OVERHEAD: u64 = 176;
const CHANNEL_OVERHEAD: u64 = 320;

#[derive(Clone, Copy)]
struct Sample {
    published: u64,
    history: Option<f64>,
    pss: u64,
    rss: u64,
    hwm: u64,
    secs: f64,
}

impl Sample {
    fn json(&self) -> serde_json::Value {
        json!({"published": self.published, "history_bytes": self.history, "pss": self.pss,
               "rss": self.rss, "hwm": self.hwm, "t": round(self.secs, 3)})
    }
}

async fn sample(ctx: &Ctx, pid: u32, published: u64, t0: Instant) -> Sample {
    Sample {
        published,
        history: ctx.metric_value("sse_gateway_history_bytes").await,
        pss: pss_bytes(pid).unwrap_or(0),
        rss: rss_bytes(pid).unwrap_or(0),
        hwm: hwm_bytes(pid).unwrap_or(0),
        secs: t0.elapsed().as_secs_f64(),
    }
}

fn row(s: &Sample) -> String {
    format!(
        "  {:>8} published  history {:>10}  Pss {:>9}  RSS {:>9}  peak RSS {:>9}  ({:.1} s)",
        s.published,
        s.history.map_or("n/a".to_owned(), |h| mib(h as u64)),
        mib(s.pss),
        mib(s.rss),
        mib(s.hwm),
        s.secs
    )
}

fn signed_mib(b: i64) -> String {
    format!("{:+.1} MiB", b as f64 / (1024.0 * 1024.0))
}

pub async fn run(ctx: &mut Ctx, o: Opts) {
    let Some(pid) = ctx.nodes.first().and_then(|t| t.pid) else {
        ctx.report
            .fail("history-memory measures the gateway's memory: spawn it or give --pid");
        return;
    };
    if ctx.common.cluster.is_some() {
        ctx.report.fail(
            "history-memory is for one gateway: in a cluster Redis keeps the history (HISTORY_MAX_BYTES does not apply)",
        );
        return;
    }
    let spawned = ctx.common.gateway_bin.is_some();
    let size: usize = ctx.env_value("HISTORY_SIZE").unwrap_or(0);
    if spawned && size == 0 {
        ctx.report
            .fail("history is off: pass --gateway-env HISTORY_SIZE=100 (or any size > 0)");
        return;
    }
    let bound: u64 = ctx
        .env_value("HISTORY_MAX_BYTES")
        .unwrap_or(DEFAULT_MAX_BYTES);
    let max_send: usize = ctx
        .env_value("MAX_SEND_BYTES")
        .unwrap_or(DEFAULT_MAX_SEND_BYTES);
    let max_items: usize = ctx
        .env_value("MAX_BATCH_ITEMS")
        .unwrap_or(DEFAULT_MAX_BATCH_ITEMS);
    let data = "x".repeat(o.event_bytes);
    let item =
        |i: usize| format!(r#"{{"op":"publish","channel":"m{i}","event":{{"data":"{data}"}}}}"#);
    let item_len = item(o.channels.max(1) - 1).len() + 1;
    // `{"requests":[...]}` stays under MAX_SEND_BYTES.
    let per_batch = o
        .batch
        .min(max_items)
        .min(max_send.saturating_sub(32) / item_len)
        .max(1);
    // What the gateway counts for one channel holding one of these events: the frame (`id:` line
    // of 28 B + the seq's digits, `data: `, the data, two line ends), the entry and the channel.
    let seq_digits = (o.channels as u64 * o.passes as u64)
        .max(1)
        .to_string()
        .len() as u64;
    let frame = 28 + seq_digits + 6 + o.event_bytes as u64 + 2;
    let frame = frame + frame / 4;
    let name = 1 + (o.channels.max(1) - 1).to_string().len() as u64;
    let per_channel = frame + ENTRY_OVERHEAD + CHANNEL_OVERHEAD + name;
    ctx.report.line(format!(
        "history-memory: {} channels x {} pass(es), one {} B event each, {per_batch} publishes per /internal/batch; \
         HISTORY_SIZE {size}, HISTORY_MAX_BYTES {bound} ({}){}; each kept channel counts ~{per_channel} B \
         (frame {frame} + entry {ENTRY_OVERHEAD} + channel {CHANNEL_OVERHEAD} + name {name}), so the bound holds ~{} channels",
        o.channels,
        o.passes,
        o.event_bytes,
        mib(bound),
        if spawned { "" } else { " (attached: assumed from --gateway-env or the default)" },
        bound / per_channel
    ));

    let mut sender = ctx.sender();
    let t0 = Instant::now();
    tokio::time::sleep(o.settle).await;
    let before = sample(ctx, pid, 0, t0).await;
    ctx.report.line(row(&before));
    let mut rows = vec![before];
    let total = o.channels as u64 * o.passes as u64;
    let every = (total / o.samples.max(1) as u64).max(1);
    let (mut published, mut ok, mut failed, mut next_sample) = (0u64, 0u64, 0u64, every);
    let mut max_history = before.history.unwrap_or(0.0);
    let mut first_failure = None;
    let t_pub = Instant::now();
    'passes: for _ in 0..o.passes {
        let mut start = 0;
        while start < o.channels {
            let end = (start + per_batch).min(o.channels);
            let mut body = String::with_capacity(16 + (end - start) * item_len);
            body.push_str(r#"{"requests":["#);
            for i in start..end {
                if i > start {
                    body.push(',');
                }
                body.push_str(&item(i));
            }
            body.push_str("]}");
            let n = (end - start) as u64;
            match sender.post("/internal/batch", body.as_bytes()).await {
                Ok((200, b)) => {
                    let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                    let good = v["results"].as_array().map_or(0, |r| {
                        r.iter().filter(|x| x["status"] == 200).count() as u64
                    });
                    ok += good;
                    failed += n - good.min(n);
                    if good < n && first_failure.is_none() {
                        first_failure =
                            Some(String::from_utf8_lossy(&b).chars().take(300).collect());
                    }
                }
                Ok((st, b)) => {
                    failed += n;
                    first_failure.get_or_insert_with(|| {
                        format!("batch status {st}: {}", String::from_utf8_lossy(&b))
                    });
                }
                Err(e) => {
                    failed += n;
                    first_failure.get_or_insert(format!("batch: {e}"));
                }
            }
            published += n;
            start = end;
            if published >= next_sample || published == total {
                next_sample += every;
                let s = sample(ctx, pid, published, t0).await;
                max_history = max_history.max(s.history.unwrap_or(0.0));
                ctx.report.line(row(&s));
                rows.push(s);
            }
            if t0.elapsed() > Duration::from_secs(ctx.common.open_timeout) {
                ctx.report.missed(format!(
                    "publishing took over --open-timeout {} s; stopped after {published}",
                    ctx.common.open_timeout
                ));
                break 'passes;
            }
        }
    }
    let pub_secs = t_pub.elapsed().as_secs_f64();
    ctx.report.line(format!(
        "published {published} events in {pub_secs:.2} s ({:.0}/s): {ok} accepted, {failed} failed",
        published as f64 / pub_secs.max(1e-9)
    ));
    if let Some(f) = &first_failure {
        ctx.report
            .fail(format!("{failed} publishes failed; first: {f}"));
    }
    tokio::time::sleep(o.settle).await;
    let after = sample(ctx, pid, published, t0).await;
    max_history = max_history.max(after.history.unwrap_or(0.0));
    ctx.report
        .line(format!("after {:.0} s settling:", o.settle.as_secs_f64()));
    ctx.report.line(row(&after));
    rows.push(after);

    let history = after.history.unwrap_or(0.0) as i64;
    let rss_growth = after.rss as i64 - before.rss as i64;
    let pss_growth = after.pss as i64 - before.pss as i64;
    let peak_growth = after.hwm as i64 - before.rss as i64;
    let kept = history as u64 / per_channel.max(1);
    let over = rss_growth - history;
    ctx.report.line(format!(
        "history bytes {} (max seen {}; bound {}), ~{kept} channels kept of {}",
        mib(history as u64),
        mib(max_history as u64),
        mib(bound),
        o.channels
    ));
    ctx.report.line(format!(
        "memory growth: RSS {} ({:.2}x the history bytes, {:.2}x the bound), Pss {}, peak RSS {} over the start's RSS",
        signed_mib(rss_growth),
        rss_growth as f64 / history.max(1) as f64,
        rss_growth as f64 / bound as f64,
        signed_mib(pss_growth),
        signed_mib(peak_growth)
    ));
    ctx.report.line(format!(
        "beyond the counted bytes: {} = {:.0} B per kept channel",
        signed_mib(over),
        over as f64 / kept.max(1) as f64
    ));
    if max_history > bound as f64 {
        ctx.report.fail(format!(
            "sse_gateway_history_bytes reached {max_history:.0}, over HISTORY_MAX_BYTES {bound}"
        ));
    }
    if spawned && max_history == 0.0 && ok > 0 {
        ctx.report
            .fail("sse_gateway_history_bytes stayed 0: the publishes were not kept");
    }
    let mut expired = None;
    if !o.expire_wait.is_zero() {
        let t = Instant::now();
        let mut left = after.history;
        while left.is_some_and(|h| h > 0.0) && t.elapsed() < o.expire_wait {
            tokio::time::sleep(Duration::from_millis(500)).await;
            left = ctx.metric_value("sse_gateway_history_bytes").await;
        }
        let emptied = t.elapsed();
        tokio::time::sleep(o.settle).await;
        let s = sample(ctx, pid, published, t0).await;
        ctx.report.line(format!(
            "after expiry (history {} after {:.1} s, then {:.0} s settling):",
            left.map_or("n/a".to_owned(), |h| format!("{h:.0} B")),
            emptied.as_secs_f64(),
            o.settle.as_secs_f64()
        ));
        ctx.report.line(row(&s));
        if left.is_some_and(|h| h > 0.0) {
            ctx.report.missed(format!(
                "history bytes still {} after --expire-wait {:.0} s (is HISTORY_TTL_SECONDS shorter?)",
                left.unwrap_or(0.0),
                o.expire_wait.as_secs_f64()
            ));
        }
        expired = Some(s);
        rows.push(s);
    }
    ctx.check_alive();
    ctx.report.set(
        "history_memory",
        json!({
            "channels": o.channels, "passes": o.passes, "event_bytes": o.event_bytes,
            "per_batch": per_batch, "history_size": size, "max_bytes": bound,
            "counted_per_channel": per_channel, "kept_channels_est": kept,
            "published": published, "accepted": ok, "failed": failed,
            "publish_seconds": round(pub_secs, 3),
            "history_bytes": after.history, "history_bytes_max": max_history,
            "rss_growth": rss_growth, "pss_growth": pss_growth, "peak_rss_growth": peak_growth,
            "rss_growth_over_history": round(rss_growth as f64 / history.max(1) as f64, 3),
            "rss_growth_over_bound": round(rss_growth as f64 / bound as f64, 3),
            "beyond_counted_per_channel": round(over as f64 / kept.max(1) as f64, 1),
            "before": before.json(), "after": after.json(),
            "expired": expired.map(|s| s.json()),
            "samples": rows.iter().map(Sample::json).collect::<Vec<_>>(),
        }),
    );
}
