//! One frame to 10,000 stream queues: shared by refcount (`Bytes::clone`, what the gateway does)
//! beside a copy per stream. Both go through `Stream::deliver`, and the queues are drained with
//! `take_batch` inside the timed loop, as the writers would.
//!
//! Also: the snapshot of an 18k-member channel, which is all a publish does under a lock.
//!
//! `cargo bench --bench fanout` — results in BENCHMARKS.md.

use std::sync::Arc;
use std::task::Waker;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sse_gateway::frame::{encode, Event};
use sse_gateway::stream::Stream;
use sse_gateway::token::Token;

const STREAMS: usize = 10_000;
const MAX_QUEUE_BYTES: usize = 1 << 20;

fn drain(streams: &[Arc<Stream>], out: &mut Vec<Bytes>) {
    for s in streams {
        s.take_batch(out, 64, Waker::noop());
        out.clear();
    }
}

fn bench(c: &mut Criterion) {
    let streams: Vec<Arc<Stream>> = (0..STREAMS)
        .map(|_| Arc::new(Stream::new(Token::random(), Bytes::new())))
        .collect();
    let mut out = Vec::with_capacity(64);
    let mut g = c.benchmark_group("fanout_10k");
    g.throughput(Throughput::Elements(STREAMS as u64));
    for size in [100usize, 4096] {
        let data = "x".repeat(size);
        let frame = encode(&Event {
            name: Some("price"),
            data: &data,
            ..Event::default()
        });
        g.bench_function(format!("{size}B/shared_refcount"), |b| {
            b.iter_batched(
                || (),
                |()| {
                    for s in &streams {
                        s.deliver(Some(&frame), false, MAX_QUEUE_BYTES, 0);
                    }
                    drain(&streams, &mut out);
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function(format!("{size}B/copy_per_stream"), |b| {
            b.iter_batched(
                || (),
                |()| {
                    for s in &streams {
                        let copy = Bytes::copy_from_slice(&frame);
                        s.deliver(Some(&copy), false, MAX_QUEUE_BYTES, 0);
                    }
                    drain(&streams, &mut out);
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();

    // How long a publish to an 18k channel holds that channel's shard lock: the copy of the member
    // pointers (`Channels::members`) is all it does under the lock; deliveries happen outside it.
    let channels = sse_gateway::channels::Channels::new();
    let members: Vec<Arc<Stream>> = (0..18_000)
        .map(|_| Arc::new(Stream::new(Token::random(), Bytes::new())))
        .collect();
    for m in &members {
        channels.join(m, ["all"], 1).unwrap();
    }
    let mut g = c.benchmark_group("publish_lock_hold");
    g.bench_function("members_snapshot_18k", |b| {
        let mut out = Vec::with_capacity(18_000);
        b.iter(|| {
            out.clear();
            channels.members("all", &mut out);
            assert_eq!(out.len(), 18_000);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
