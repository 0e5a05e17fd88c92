//! One heartbeat sweep over 100,000 streams: every registry shard (`Registry::heartbeat_shard`,
//! what the heartbeat task runs over one period) beside a naive loop over a `Vec<Arc<Stream>>`.
//! Before each timed sweep every queue is drained and every stream has a parked waker (as an idle
//! writer would), so every stream gets its heartbeat and one wake in both variants.
//!
//! `cargo bench --bench heartbeat` — results in BENCHMARKS.md.

use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sse_gateway::registry::{Registry, SHARDS};
use sse_gateway::stream::Stream;
use sse_gateway::token::Token;

const STREAMS: usize = 100_000;

/// Empties each queue and parks a waker, as an idle writer task would.
fn park_all(streams: &[Arc<Stream>], out: &mut Vec<Bytes>) {
    for s in streams {
        s.take_batch(out, 64, Waker::noop());
        s.take_batch(out, 64, Waker::noop());
        out.clear();
    }
}

fn bench(c: &mut Criterion) {
    let registry = Registry::new();
    let in_registry: Vec<Arc<Stream>> = (0..STREAMS)
        .map(|_| registry.insert(Bytes::new()).expect("room"))
        .collect();
    let naive: Vec<Arc<Stream>> = (0..STREAMS)
        .map(|_| Arc::new(Stream::new(Token::random(), Bytes::new())))
        .collect();
    let mut out = Vec::with_capacity(64);
    let mut wakers: Vec<Waker> = Vec::with_capacity(1024);

    let mut g = c.benchmark_group("heartbeat_sweep_100k");
    g.throughput(Throughput::Elements(STREAMS as u64));
    g.sample_size(20);
    g.bench_function("registry_shard_sweep", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                park_all(&in_registry, &mut out);
                let t0 = Instant::now();
                let queued: usize = (0..SHARDS)
                    .map(|shard| registry.heartbeat_shard(shard, &mut wakers))
                    .sum();
                total += t0.elapsed();
                assert_eq!(queued, STREAMS);
            }
            total
        })
    });
    g.bench_function("naive_vec_loop", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                park_all(&naive, &mut out);
                let t0 = Instant::now();
                let mut queued = 0;
                for s in &naive {
                    if let Some(parked) = s.heartbeat() {
                        if let Some(w) = parked {
                            w.wake();
                        }
                        queued += 1;
                    }
                }
                total += t0.elapsed();
                assert_eq!(queued, STREAMS);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
