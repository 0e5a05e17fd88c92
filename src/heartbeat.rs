//! Heartbeats: ONE task keeps every stream alive, sweeping the registry at a steady pace.
//!
//! Owns the cadence only. Each tick, `interval / SHARDS` apart, sweeps one registry shard in slot
//! order. Streams are spread over shards round-robin, so each stream gets a heartbeat once per
//! interval, the first within one interval of opening, and the work (and the wake-ups of writer
//! tasks) is spread evenly over the period instead of landing in one burst. Walking one shard's slab
//! in order reads memory sequentially (a strided walk over every shard per tick was 2.7x slower). There is no
//! timer and no task per stream. It must not decide what a heartbeat is (see [`crate::frame`]) or
//! whether a stream takes one (see [`crate::stream::Stream::heartbeat`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::gateway::Gateway;
use crate::registry::SHARDS;

/// Runs until the task is aborted (at shutdown).
pub async fn run(gateway: Arc<Gateway>) {
    // 64 ticks per interval: each tick's burst is 1/64 of the streams (280 wake-ups at 18k
    // streams), and a tick at the shortest interval (1 s) is still a relaxed 15.6 ms.
    let tick = gateway.config.heartbeat_interval / SHARDS as u32;
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + tick,
        tick.max(Duration::from_millis(1)),
    );
    // A late tick (a stalled runtime) is caught up at once: skipping would skip a shard's streams.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut wakers = Vec::new();
    for shard in (0..SHARDS).cycle() {
        ticker.tick().await;
        let visited = gateway.registry.heartbeat_shard(shard, &mut wakers);
        gateway
            .metrics
            .heartbeats_total
            .fetch_add(visited as u64, Ordering::Relaxed);
    }
}
