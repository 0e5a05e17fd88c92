//! One frame to 10,000 stream queues: shared by refcount (`Bytes::clone`, what the gateway does)
//! beside a copy per stream. Both go through `Stream::deliver`, and the queues are drained with
//! `take_batch` inside the timed loop, as the writers would.
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
                        s.deliver(Some(&frame), false, MAX_QUEUE_BYTES);
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
                        s.deliver(Some(&copy), false, MAX_QUEUE_BYTES);
                    }
                    drain(&streams, &mut out);
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
