//! The sharded registry beside one `Mutex<HashMap<Token, Arc<Stream>>>`, with two threads contending:
//! each thread runs rounds of insert 64 → get each → remove each.
//!
//! `cargo bench --bench registry` — results in BENCHMARKS.md.

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sse_gateway::registry::Registry;
use sse_gateway::stream::Stream;
use sse_gateway::token::Token;

const THREADS: usize = 2;
/// Streams each thread holds at once in a round.
const BATCH: usize = 64;
/// Streams already in the map, so lookups don't run on an empty table.
const PRELOAD: usize = 10_000;

trait Map: Sync {
    fn insert(&self) -> Token;
    fn get(&self, t: Token) -> Option<Arc<Stream>>;
    fn remove(&self, t: Token) -> bool;
}

impl Map for Registry {
    fn insert(&self) -> Token {
        Registry::insert(self, Bytes::new()).expect("room").token
    }
    fn get(&self, t: Token) -> Option<Arc<Stream>> {
        Registry::get(self, t)
    }
    fn remove(&self, t: Token) -> bool {
        Registry::remove(self, t)
    }
}

/// The baseline: a global map behind one lock.
#[derive(Default)]
struct Naive(Mutex<HashMap<Token, Arc<Stream>>>);

impl Map for Naive {
    fn insert(&self) -> Token {
        let token = Token::random();
        let stream = Arc::new(Stream::new(token, Bytes::new()));
        self.0.lock().unwrap().insert(token, stream);
        token
    }
    fn get(&self, t: Token) -> Option<Arc<Stream>> {
        self.0.lock().unwrap().get(&t).cloned()
    }
    fn remove(&self, t: Token) -> bool {
        let removed = self.0.lock().unwrap().remove(&t);
        removed.is_some()
    }
}

/// Runs `rounds` rounds on each of THREADS threads at once; returns the wall time.
fn contend<M: Map>(map: &M, rounds: u64) -> Duration {
    let barrier = Barrier::new(THREADS + 1);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let mut tokens = Vec::with_capacity(BATCH);
                barrier.wait();
                for _ in 0..rounds {
                    tokens.extend((0..BATCH).map(|_| map.insert()));
                    for &t in &tokens {
                        black_box(map.get(t));
                    }
                    for t in tokens.drain(..) {
                        assert!(map.remove(t));
                    }
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let t0 = Instant::now();
        barrier.wait();
        t0.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry_2_threads");
    // One "element" = one insert + one get + one remove.
    g.throughput(Throughput::Elements((THREADS * BATCH) as u64));
    let registry = Registry::new();
    let keep_r: Vec<_> = (0..PRELOAD)
        .map(|_| registry.insert(Bytes::new()))
        .collect();
    g.bench_function("sharded_registry", |b| {
        b.iter_custom(|rounds| contend(&registry, rounds))
    });
    let naive = Naive::default();
    let keep_n: Vec<_> = (0..PRELOAD).map(|_| naive.insert()).collect();
    g.bench_function("mutex_hashmap", |b| {
        b.iter_custom(|rounds| contend(&naive, rounds))
    });
    g.finish();
    drop((keep_r, keep_n));
}

criterion_group!(benches, bench);
criterion_main!(benches);
