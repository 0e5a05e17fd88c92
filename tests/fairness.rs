//! No request keeps a runtime worker busy for long (PROTOCOL §9), black-box: `/healthz` stays
//! quick while the largest allowed subscribe and 1 MiB publishes run back to back, on a gateway
//! with ONE worker thread, so every request shares it. Its own test binary: the latency it
//! measures should not include other tests' gateways fighting for the same two cores.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Gateway, HttpConn, Reply};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

const MEMBERS: usize = 20;
const LOAD_TIME: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_stays_quick_during_the_largest_subscribe_and_1mib_publishes() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("WORKER_THREADS", "1")
        .spawn()
        .await;
    backend.on_connect(Reply::ok().body(json!({"channels": ["big"]}).to_string()));
    for i in 0..MEMBERS {
        let (stream, _) = gw.open(&mut backend, &format!("/member/{i}")).await;
        // Drained, not parsed: the members must keep taking 1 MiB frames without the test
        // process spending its CPU on them.
        let mut socket = stream.into_socket();
        tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
        });
    }
    backend.on_connect(Reply::ok());
    let (_subscriber, token) = gw.open(&mut backend, "/subscriber").await;

    let control = gw.control_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let (subscribes, publishes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let names: Vec<String> = (0..1024).map(|i| format!("{i:0>250}")).collect();
    let join = serde_json::to_vec(&json!({"token": token, "channels": names})).unwrap();
    let memberships = {
        let (stop, done) = (stop.clone(), subscribes.clone());
        tokio::spawn(async move {
            let mut conn = HttpConn::connect(control).await;
            while !stop.load(Ordering::Relaxed) {
                for route in ["/internal/subscribe", "/internal/unsubscribe"] {
                    let answer = conn.request("POST", route, &[], Some(&join)).await;
                    assert_eq!(answer.status(), 200, "{route}: {}", answer.text());
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The largest body MAX_SEND_BYTES allows.
    let mut publish =
        serde_json::to_vec(&json!({"channel": "big", "event": {"data": ""}})).unwrap();
    let data_at = publish.len() - 3;
    publish.splice(
        data_at..data_at,
        std::iter::repeat_n(b'x', (1 << 20) - publish.len()),
    );
    assert_eq!(publish.len(), 1 << 20);
    let publisher = {
        let (stop, done) = (stop.clone(), publishes.clone());
        tokio::spawn(async move {
            let mut conn = HttpConn::connect(control).await;
            while !stop.load(Ordering::Relaxed) {
                let answer = conn
                    .request("POST", "/internal/publish", &[], Some(&publish))
                    .await;
                assert_eq!(answer.status(), 200, "{}", answer.text());
                assert_eq!(answer.json()["delivered"], MEMBERS);
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let mut probe = HttpConn::connect(gw.addr).await;
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < LOAD_TIME {
        let sent = Instant::now();
        let answer = probe.request("GET", "/healthz", &[], None).await;
        latencies.push(sent.elapsed());
        assert_eq!(answer.status(), 200);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    memberships.await.expect("subscribe loop");
    publisher.await.expect("publish loop");

    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let (subscribes, publishes) = (
        subscribes.load(Ordering::Relaxed),
        publishes.load(Ordering::Relaxed),
    );
    println!(
        "/healthz: {} probes, p50 {:?}, p99 {p99:?}, max {:?}; {subscribes} subscribe+unsubscribe pairs of 1024 names, {publishes} publishes of 1 MiB to {MEMBERS} streams",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
    // The load was real: both kinds of request ran many times while the probes did.
    assert!(
        subscribes >= 5 && publishes >= 5,
        "{subscribes} / {publishes}"
    );
    assert!(p99 < Duration::from_millis(50), "/healthz p99 {p99:?}");
}
