//! Heartbeats: ONE task keeps every stream alive, sweeping the registry at a steady pace.
//!
//! Owns the cadence only. Slots are split into `BUCKETS` buckets by slot index (mod `BUCKETS`); each
//! tick, `interval / BUCKETS` apart, visits one bucket in every shard. So each stream gets a heartbeat
//! once per interval, the first within one interval of opening, and the work (and the wake-ups of
//! connection tasks) is spread evenly over the period instead of landing in one burst. There is no
//! timer and no task per stream. It must not decide what a heartbeat is (see [`crate::frame`]) or
//! whether a stream takes one (see [`crate::stream::Stream::heartbeat`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::gateway::Gateway;

/// Ticks per interval. 64 keeps each tick's burst at 1/64 of the streams (280 wake-ups per tick at
/// 18k streams) while a tick at the shortest interval (1 s) is still a relaxed 15.6 ms.
pub const BUCKETS: usize = 64;

/// Runs until the task is aborted (at shutdown).
pub async fn run(gateway: Arc<Gateway>) {
    let tick = gateway.config.heartbeat_interval / BUCKETS as u32;
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + tick,
        tick.max(Duration::from_millis(1)),
    );
    // A late tick (a stalled runtime) is caught up at once: skipping would skip a bucket's streams.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut wakers = Vec::new();
    for bucket in (0..BUCKETS).cycle() {
        ticker.tick().await;
        let visited = gateway
            .registry
            .heartbeat_bucket(bucket, BUCKETS, &mut wakers);
        gateway
            .metrics
            .heartbeats_total
            .fetch_add(visited as u64, Ordering::Relaxed);
    }
}
