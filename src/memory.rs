//! Memory: hands back to the OS what a burst left behind (PROTOCOL §9 "Memory goes back").
//!
//! Owns when the allocator tidies up; it must not allocate on anyone's behalf or decide what is
//! kept. The allocator is mimalloc, which keeps one heap per thread and tidies a heap only on its own
//! thread, when that thread allocates or calls `mi_collect`: a block freed by another thread waits on
//! its page's cross-thread list, an emptied page goes back to the arena only when its owner collects,
//! and the arena returns it to the OS (`madvise`) only when some thread collects after the purge
//! delay. Tokio's workers sleep when there is nothing to do, so after a burst (the queues of stalled
//! clients filled on one worker, dropped on another when the clients left) nothing ever collected:
//! measured on 500 stalled streams whose 1 MiB queues overflowed, 200 MiB stayed resident with 0
//! connections for as long as it was watched (40 s); with this module it is back to 11 MiB, 2.2 MiB
//! above the level before the burst, within 2–4 s (BENCHMARKS.md §5).
//!
//! Two parts:
//! - [`on_thread_park`], the runtime's `on_thread_park` hook: a worker about to sleep runs
//!   `mi_collect(true)` on its heap, at most once per [`COLLECT_EVERY`] (a thread-local instant), so
//!   a busy worker that parks thousands of times a second pays an `Instant::now()` per park and one
//!   collect per second: 40–300 µs with 18k idle streams (more when it returns many MiB, which is
//!   the kernel freeing pages).
//! - one sweeper task, started by the first park: a worker that went to sleep right after its
//!   collect, or whose pages another worker emptied afterwards, would not collect again until
//!   traffic woke it. After any park the sweeper waits [`COLLECT_EVERY`] and has every worker run a
//!   poke task, so each parks, and collects, once more. An idle gateway keeps this round going once
//!   a second (heartbeat ticks are parks too): a few wake-ups and collects a second in all.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Once;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How often one worker collects at most, and how long after a park the sweeper wakes the workers.
/// mimalloc's own purge delay is 1 s; collecting more often would find little more to return.
pub const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// A sweeper round gives up after this; the next round tries again. It normally takes well under
/// a millisecond.
const POKE_FOR: Duration = Duration::from_millis(5);

thread_local! {
    /// When this worker last collected its heap.
    static LAST_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The last sweeper round whose poke ran on this worker.
    static POKED_IN: Cell<u64> = const { Cell::new(0) };
}

/// A worker parked since the sweeper last looked.
static PARKED: AtomicBool = AtomicBool::new(false);
static SWEEPER_WAKE: Notify = Notify::const_new();
static SWEEPER_STARTED: Once = Once::new();
/// Workers reached by the current round's pokes.
static POKED: AtomicUsize = AtomicUsize::new(0);

/// The runtime's `on_thread_park` hook: collects this thread's heap unless it did so within
/// [`COLLECT_EVERY`], and has the sweeper come round.
pub fn on_thread_park() {
    let now = Instant::now();
    let due = LAST_COLLECT.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < COLLECT_EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        // SAFETY: `mi_collect` takes a plain bool and works on the calling thread's own heap.
        // `true` also visits full pages and purges what the arenas hold without waiting for the
        // purge delay: a non-forced collect leaves a purge for a later collect that may never come.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
    // Under load the flag is nearly always set: one load of a read-mostly line per park.
    if !PARKED.load(Relaxed) && !PARKED.swap(true, Relaxed) {
        SWEEPER_STARTED.call_once(start_sweeper);
        SWEEPER_WAKE.notify_one();
    }
}

fn start_sweeper() {
    // Parks happen on runtime workers, so there is a runtime; anywhere else there is nothing to do.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(sweep(runtime.metrics().num_workers()));
    }
}

/// After a park, waits one period, then has every worker run a poke, so each parks again.
async fn sweep(workers: usize) {
    for round in 1u64.. {
        SWEEPER_WAKE.notified().await;
        tokio::time::sleep(COLLECT_EVERY).await;
        PARKED.store(false, Relaxed);
        POKED.store(0, Relaxed);
        let until = Instant::now() + POKE_FOR;
        for _ in 0..workers {
            tokio::spawn(poke(round, workers, until));
        }
    }
}

/// Yields until every worker has run one of this round's pokes. A sleeping worker is woken only to
/// steal runnable work, and only while no other worker is searching, so no-op tasks would all run
/// on the spawning worker before another woke up; these stay runnable (each yield wakes a sleeper
/// when none is searching) until each worker has run one.
async fn poke(round: u64, workers: usize, until: Instant) {
    loop {
        if POKED_IN.with(|r| r.replace(round)) != round {
            POKED.fetch_add(1, Relaxed);
        }
        if POKED.load(Relaxed) >= workers || Instant::now() >= until {
            return;
        }
        tokio::task::yield_now().await;
    }
}
