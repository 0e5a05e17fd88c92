//! Frame encoding: `frame::encode` (one exact-size allocation, one pass to split lines) beside a naive
//! encoder that builds a `String` with `format!` per field and a `String` per data line.
//!
//! `cargo bench --bench frame` — results in BENCHMARKS.md.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sse_gateway::frame::{encode, Event};

/// The baseline: what a first version would write.
fn naive_encode(event: &Event<'_>) -> Bytes {
    let mut out = String::new();
    if let Some(name) = event.name.filter(|n| !n.is_empty()) {
        out.push_str(&format!("event: {name}\n"));
    }
    if let Some(id) = event.id {
        out.push_str(&format!("id: {id}\n"));
    }
    if let Some(retry) = event.retry {
        out.push_str(&format!("retry: {retry}\n"));
    }
    let normalized = event.data.replace("\r\n", "\n").replace('\r', "\n");
    let lines: Vec<String> = normalized.split('\n').map(str::to_owned).collect();
    for line in lines {
        out.push_str(&format!("data: {line}\n"));
    }
    out.push('\n');
    Bytes::from(out)
}

fn cases() -> Vec<(&'static str, String)> {
    let kib4: String = "x".repeat(4096);
    let mut mixed = String::new();
    for i in 0..64 {
        mixed.push_str("line of text ");
        mixed.push_str(["\r\n", "\r", "\n"][i % 3]);
    }
    vec![
        ("one_line", r#"{"price":101.25,"symbol":"ACME"}"#.to_owned()),
        (
            "multi_line_8",
            (0..8)
                .map(|i| format!("row {i}: some text"))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        ("4kib_one_line", kib4),
        ("crlf_mix_64", mixed),
    ]
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_encode");
    for (name, data) in cases() {
        let ev = Event {
            name: Some("update"),
            id: Some("42"),
            retry: None,
            data: &data,
        };
        assert_eq!(
            encode(&ev),
            naive_encode(&ev),
            "{name}: the two encoders agree"
        );
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(format!("{name}/encode"), |b| {
            b.iter(|| encode(black_box(&ev)))
        });
        g.bench_function(format!("{name}/naive"), |b| {
            b.iter(|| naive_encode(black_box(&ev)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
