//! Metrics: the counters of PROTOCOL §7, kept in atomics and rendered as Prometheus text on demand.
//!
//! Owns counting and the exposition format. Hot paths only do relaxed atomic adds; nothing here
//! allocates except [`Metrics::render`], which runs per scrape.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::stream::EndReason;

#[derive(Clone, Copy, Debug)]
pub enum CallbackAction {
    Connect = 0,
    Disconnect = 1,
}

impl CallbackAction {
    const ALL: [CallbackAction; 2] = [CallbackAction::Connect, CallbackAction::Disconnect];

    pub fn as_str(self) -> &'static str {
        match self {
            CallbackAction::Connect => "connect",
            CallbackAction::Disconnect => "disconnect",
        }
    }
}

/// Upper bounds (seconds) of the callback latency histogram: 1 ms to the 5 s default timeout.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default)]
struct Histogram {
    /// Per bucket (not cumulative), plus the overflow bucket at the end.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub events_sent_total: AtomicU64,
    pub bytes_sent_total: AtomicU64,
    pub heartbeats_total: AtomicU64,
    pub publishes_total: AtomicU64,
    pub publish_deliveries_total: AtomicU64,
    /// `writev` calls on stream sockets, by the writer tasks and by direct writes: with
    /// `events_sent_total`, shows how many frames one write carried.
    pub socket_writes_total: AtomicU64,
    pub batches_total: AtomicU64,
    pub batch_items_total: AtomicU64,
    /// Streams that came back with a position (PROTOCOL §11): resumed completely, or given a gap.
    resumes: [AtomicU64; 2],
    disconnects: [AtomicU64; 3],
    callback_errors: [AtomicU64; 2],
    callback_latency: [Histogram; 2],
}

impl Metrics {
    pub fn resumed(&self, complete: bool) {
        self.resumes[usize::from(!complete)].fetch_add(1, Relaxed);
    }

    pub fn disconnect(&self, reason: EndReason) {
        self.disconnects[reason.index()].fetch_add(1, Relaxed);
    }

    pub fn callback_error(&self, action: CallbackAction) {
        self.callback_errors[action as usize].fetch_add(1, Relaxed);
    }

    pub fn callback_latency(&self, action: CallbackAction, elapsed: Duration) {
        let h = &self.callback_latency[action as usize];
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        h.buckets[bucket].fetch_add(1, Relaxed);
        h.sum_micros
            .fetch_add(elapsed.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    /// `callback_queue`: callbacks waiting for a slot, indexed by [`CallbackAction`].
    pub fn render(
        &self,
        connections: usize,
        channels: usize,
        callback_queue: [usize; 2],
        history_bytes: usize,
    ) -> String {
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, value: u64| {
            family(&mut out, name, "counter", help, "", [("", value)]);
        };
        counter(
            "sse_gateway_connections_total",
            "Streams accepted since start.",
            self.connections_total.load(Relaxed),
        );
        counter(
            "sse_gateway_events_sent_total",
            "Event frames queued to streams.",
            self.events_sent_total.load(Relaxed),
        );
        counter(
            "sse_gateway_bytes_sent_total",
            "Frame bytes handed to connections (events and heartbeats).",
            self.bytes_sent_total.load(Relaxed),
        );
        counter(
            "sse_gateway_heartbeats_total",
            "Heartbeat frames queued.",
            self.heartbeats_total.load(Relaxed),
        );
        counter(
            "sse_gateway_publishes_total",
            "Accepted /internal/publish requests.",
            self.publishes_total.load(Relaxed),
        );
        counter(
            "sse_gateway_publish_deliveries_total",
            "Streams a publish was queued on, summed over publishes.",
            self.publish_deliveries_total.load(Relaxed),
        );
        counter(
            "sse_gateway_socket_writes_total",
            "writev calls on stream sockets (frames, heartbeats and ends; direct or by the writer).",
            self.socket_writes_total.load(Relaxed),
        );
        counter(
            "sse_gateway_batches_total",
            "Accepted /internal/batch requests.",
            self.batches_total.load(Relaxed),
        );
        counter(
            "sse_gateway_batch_items_total",
            "Items of accepted /internal/batch requests, whatever each item's answer.",
            self.batch_items_total.load(Relaxed),
        );
        let gauge = |out: &mut String, name: &str, help: &str, value: usize| {
            family(out, name, "gauge", help, "", [("", value as u64)]);
        };
        gauge(
            &mut out,
            "sse_gateway_channels",
            "Channels with at least one member.",
            channels,
        );
        gauge(
            &mut out,
            "sse_gateway_connections",
            "Open streams.",
            connections,
        );
        gauge(
            &mut out,
            "sse_gateway_history_bytes",
            "Bytes of channel history this process keeps for Last-Event-ID resume (0 with history off, and in a cluster, where Redis keeps it).",
            history_bytes,
        );
        family(
            &mut out,
            "sse_gateway_resumes_total",
            "counter",
            "Streams opened with a Last-Event-ID while history is on, by result.",
            "result",
            [
                ("complete", self.resumes[0].load(Relaxed)),
                ("gap", self.resumes[1].load(Relaxed)),
            ],
        );
        family(
            &mut out,
            "sse_gateway_disconnects_total",
            "counter",
            "Streams ended, by reason.",
            "reason",
            EndReason::ALL.map(|r| (r.as_str(), self.disconnects[r.index()].load(Relaxed))),
        );
        family(
            &mut out,
            "sse_gateway_callback_errors_total",
            "counter",
            "Callbacks that failed (transport, timeout or non-2xx).",
            "action",
            CallbackAction::ALL
                .map(|a| (a.as_str(), self.callback_errors[a as usize].load(Relaxed))),
        );
        family(
            &mut out,
            "sse_gateway_callback_queue",
            "gauge",
            "Callbacks waiting to be sent (not yet in flight).",
            "action",
            CallbackAction::ALL.map(|a| (a.as_str(), callback_queue[a as usize] as u64)),
        );
        out.push_str("# HELP sse_gateway_callback_duration_seconds Callback latency.\n# TYPE sse_gateway_callback_duration_seconds histogram\n");
        for action in CallbackAction::ALL {
            let h = &self.callback_latency[action as usize];
            let name = action.as_str();
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "sse_gateway_callback_duration_seconds_bucket{{action=\"{name}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += h.buckets[LATENCY_BUCKETS.len()].load(Relaxed);
            let _ = writeln!(
                out,
                "sse_gateway_callback_duration_seconds_bucket{{action=\"{name}\",le=\"+Inf\"}} {cumulative}\nsse_gateway_callback_duration_seconds_sum{{action=\"{name}\"}} {}\nsse_gateway_callback_duration_seconds_count{{action=\"{name}\"}} {cumulative}",
                h.sum_micros.load(Relaxed) as f64 / 1e6
            );
        }
        out
    }
}

/// What a node of a cluster adds to the metrics (PROTOCOL §10); absent on a single node.
pub struct ClusterGauges {
    pub nodes: usize,
    pub redis_up: bool,
    /// Requests this node forwarded through Redis, by kind.
    pub forwarded: [(&'static str, u64); 3],
}

impl ClusterGauges {
    pub fn render(&self, out: &mut String) {
        family(
            out,
            "sse_gateway_cluster_nodes",
            "gauge",
            "Gateways in the deployment, as Redis last listed them.",
            "",
            [("", self.nodes as u64)],
        );
        family(
            out,
            "sse_gateway_redis_up",
            "gauge",
            "1 while this node is joined to Redis, else 0.",
            "",
            [("", u64::from(self.redis_up))],
        );
        family(
            out,
            "sse_gateway_cluster_forwarded_total",
            "counter",
            "Requests this node forwarded to other nodes through Redis, by kind.",
            "kind",
            self.forwarded,
        );
    }
}

/// One metric family: its HELP and TYPE lines, then a sample per `(label value, value)`; with an
/// empty `label` name, the one unlabelled sample.
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'static str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (label_value, value) in samples {
        let _ = if label.is_empty() {
            writeln!(out, "{name} {value}")
        } else {
            writeln!(out, "{name}{{{label}=\"{label_value}\"}} {value}")
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_match() {
        let m = Metrics::default();
        m.callback_latency(CallbackAction::Connect, Duration::from_micros(500));
        m.callback_latency(CallbackAction::Connect, Duration::from_millis(30));
        m.callback_latency(CallbackAction::Connect, Duration::from_secs(9));
        let text = m.render(0, 0, [0, 7], 0);
        assert!(text.contains("sse_gateway_callback_queue{action=\"disconnect\"} 7\n"));
        assert!(text.contains(
            "sse_gateway_callback_duration_seconds_bucket{action=\"connect\",le=\"0.001\"} 1\n"
        ));
        assert!(text.contains(
            "sse_gateway_callback_duration_seconds_bucket{action=\"connect\",le=\"0.05\"} 2\n"
        ));
        assert!(text.contains(
            "sse_gateway_callback_duration_seconds_bucket{action=\"connect\",le=\"+Inf\"} 3\n"
        ));
        assert!(
            text.contains("sse_gateway_callback_duration_seconds_count{action=\"connect\"} 3\n")
        );
        assert!(
            text.contains("sse_gateway_callback_duration_seconds_count{action=\"disconnect\"} 0\n")
        );
    }
}
