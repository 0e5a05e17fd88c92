//! Callback bursts and per-request work bounds (PROTOCOL §9), black-box: disconnect storms against
//! a slow backend, across SIGTERM, against a backend that is down for a while; the channel limit.
//!
//! The storms hold 5000 client sockets in this process and 5000 in the gateway's (plus at most
//! 2 × CALLBACK_CONCURRENCY to the backend): well under the 20000 open-file limit, even with two
//! such tests running at once.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{http, Backend, Gateway, Reply, SseStream, SOON};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

const STORM: usize = 5000;
const SLOW_BACKEND: Duration = Duration::from_millis(300);

/// Opens `n` streams at once (bounded by the gateway's connect concurrency) and returns them with
/// the tokens the backend was given, in no particular order.
async fn open_many(gw: &Gateway, backend: &mut Backend, n: usize) -> (Vec<SseStream>, Vec<String>) {
    let mut opening = JoinSet::new();
    for i in 0..n {
        let addr = gw.addr;
        opening.spawn(async move {
            http::open_stream(addr, &format!("/storm/{i}"))
                .await
                .unwrap_or_else(|r| panic!("stream {i} refused: {} {}", r.status(), r.text()))
        });
    }
    let mut tokens = Vec::with_capacity(n);
    while tokens.len() < n {
        tokens.push(backend.next_connect().await.token().to_owned());
    }
    let mut streams = Vec::with_capacity(n);
    while let Some(stream) = opening.join_next().await {
        streams.push(stream.expect("open task"));
    }
    (streams, tokens)
}

/// Collects disconnect callbacks until every token in `tokens` has one, failing after `within`;
/// then waits `quiet` for duplicates. Returns the reason each token got.
async fn every_disconnect_once(
    backend: &mut Backend,
    tokens: &[String],
    within: Duration,
    quiet: Duration,
) -> HashMap<String, String> {
    let deadline = Instant::now() + within;
    let mut seen: HashMap<String, String> = HashMap::new();
    while seen.len() < tokens.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(cb) = backend.try_next(left).await else {
            panic!(
                "{} of {} disconnects arrived within {within:?}",
                seen.len(),
                tokens.len()
            );
        };
        assert_eq!(cb.action(), "disconnect", "{:?}", cb.body);
        let reason = cb.reason().unwrap_or("").to_owned();
        if let Some(first) = seen.insert(cb.token().to_owned(), reason) {
            panic!("a second disconnect for {} (first: {first})", cb.token());
        }
    }
    for token in tokens {
        assert!(seen.contains_key(token), "no disconnect for {token}");
    }
    backend.expect_none(quiet).await;
    seen
}

/// 5000 clients leave at once and the backend takes 300 ms per disconnect: with 64 callbacks in
/// flight that is ~24 s of callbacks, five times the callback timeout. Every token still gets its
/// one disconnect: time spent queued is not time spent waiting for the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_storm_against_a_slow_backend_loses_nothing() {
    let mut backend = Backend::start().await;
    backend.on_disconnect(Reply::ok().delay(SLOW_BACKEND));
    let gw = Gateway::start(&backend).await;
    let (streams, tokens) = open_many(&gw, &mut backend, STORM).await;
    drop(streams);
    // The streams are gone long before their callbacks are: the queue holds them meanwhile.
    gw.wait_metrics(SOON, |m| {
        m.value("sse_gateway_connections", &[]) == 0.0
            && m.value("sse_gateway_callback_queue", &[("action", "disconnect")]) > 1000.0
    })
    .await;
    let reasons = every_disconnect_once(
        &mut backend,
        &tokens,
        Duration::from_secs(90),
        Duration::from_secs(1),
    )
    .await;
    assert!(reasons.values().all(|r| r == "client_closed"));
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "sse_gateway_callback_errors_total",
            &[("action", "disconnect")]
        ),
        0.0
    );
    assert_eq!(
        m.value("sse_gateway_callback_queue", &[("action", "disconnect")]),
        0.0
    );
    // A bounded pool, not a socket per disconnect: 64 connects + 64 disconnects at most.
    assert!(
        backend.connections() <= 128,
        "{} backend connections",
        backend.connections()
    );
}

/// SIGTERM with 5000 open streams and the same slow backend: every stream gets its
/// `server_closed` disconnect, and the process exits 0 as soon as the queue is empty, well before
/// the grace period ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_every_queued_disconnect_then_exits_early() {
    let mut backend = Backend::start().await;
    backend.on_disconnect(Reply::ok().delay(SLOW_BACKEND));
    let mut gw = Gateway::builder()
        .callback(&backend)
        .env("CALLBACK_CONCURRENCY", "256")
        .env("SHUTDOWN_GRACE_SECONDS", "60")
        .spawn()
        .await;
    let (_streams, tokens) = open_many(&gw, &mut backend, STORM).await;
    let signalled = Instant::now();
    gw.signal(libc::SIGTERM);
    // 5000 × 300 ms over 256 slots is ~6 s of callbacks.
    let reasons = every_disconnect_once(
        &mut backend,
        &tokens,
        Duration::from_secs(50),
        Duration::ZERO,
    )
    .await;
    assert!(reasons.values().all(|r| r == "server_closed"));
    let status = gw.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(45),
        "exited only after {:?}",
        signalled.elapsed()
    );
    backend.expect_none(Duration::from_millis(200)).await;
}

/// A backend that is down (connection refused) when a stream ends gets that disconnect once it
/// is back, within CALLBACK_RETRY_SECONDS; not twice, and nothing is counted as an error.
#[tokio::test]
async fn a_disconnect_that_could_not_be_sent_is_retried_until_the_backend_is_back() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("LOG_LEVEL", "debug")
        .env("CALLBACK_RETRY_SECONDS", "30")
        .spawn()
        .await;
    let (stream, token) = gw.open(&mut backend, "/retry").await;
    backend.stop();
    drop(stream);
    let retrying = gw
        .logs
        .wait_for(|l| l.contains("retrying") && l.contains(&token), SOON)
        .await;
    assert!(
        retrying.is_some(),
        "no retry logged: {:#?}",
        gw.logs.lines()
    );
    backend.restart().await;
    backend.next_disconnect(&token, "client_closed").await;
    backend.expect_none(Duration::from_millis(500)).await;
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "sse_gateway_callback_errors_total",
            &[("action", "disconnect")]
        ),
        0.0
    );
}

/// Past CALLBACK_RETRY_SECONDS the disconnect is given up: logged with the URL, counted.
#[tokio::test]
async fn a_backend_down_for_longer_than_the_retry_window_costs_one_logged_error() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("CALLBACK_RETRY_SECONDS", "1")
        .spawn()
        .await;
    let (stream, token) = gw.open(&mut backend, "/gone").await;
    backend.stop();
    drop(stream);
    let failed = gw
        .logs
        .wait_for(
            |l| l.contains("disconnect callback to") && l.contains(&token),
            SOON,
        )
        .await
        .unwrap_or_else(|| panic!("no failure logged: {:#?}", gw.logs.lines()));
    assert!(failed.contains(&backend.url()), "{failed}");
    assert!(failed.contains("refused"), "{failed}");
    gw.wait_metrics(SOON, |m| {
        m.value(
            "sse_gateway_callback_errors_total",
            &[("action", "disconnect")],
        ) == 1.0
    })
    .await;
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}.{i}")).collect()
}

async fn subscribe(gw: &Gateway, token: &str, channels: &[String]) -> http::Response {
    let body = json!({"token": token, "channels": channels});
    gw.post("/internal/subscribe", &body).await
}

const LIMIT_MESSAGE: &str = "Invalid request: a stream may be in at most 1024 channels (MAX_CHANNELS_PER_STREAM); nothing was changed";

#[tokio::test]
async fn a_stream_holds_at_most_max_channels_and_a_refused_subscribe_changes_nothing() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let (_stream, token) = gw.open(&mut backend, "/many").await;

    // At the bound, in one request, with duplicates counted once.
    let mut full = names("a", 1024);
    full.extend(names("a", 10));
    subscribe(&gw, &token, &full)
        .await
        .assert_json(200, json!({"status": "ok"}));
    assert_eq!(
        gw.metrics().await.value("sse_gateway_channels", &[]),
        1024.0
    );
    // Names already held cost nothing against the bound.
    subscribe(&gw, &token, &names("a", 1024))
        .await
        .assert_json(200, json!({"status": "ok"}));
    // One past it: 400, and the stream is in none of the new names.
    let mut one_more = names("a", 3);
    one_more.push("b.0".into());
    subscribe(&gw, &token, &one_more)
        .await
        .assert_json(400, json!({"error": LIMIT_MESSAGE}));
    assert_eq!(
        gw.metrics().await.value("sse_gateway_channels", &[]),
        1024.0
    );
    let publish = json!({"channel": "b.0", "event": {"data": "x"}});
    gw.post("/internal/publish", &publish)
        .await
        .assert_json(200, json!({"status": "ok", "delivered": 0}));
    // Leaving one makes room for one.
    let leave = json!({"token": token, "channels": ["a.0"]});
    gw.post("/internal/unsubscribe", &leave)
        .await
        .assert_json(200, json!({"status": "ok"}));
    subscribe(&gw, &token, &["b.0".to_string()])
        .await
        .assert_json(200, json!({"status": "ok"}));

    // 1025 distinct names in one request for a fresh stream: refused whole.
    let (_other, other) = gw.open(&mut backend, "/other").await;
    subscribe(&gw, &other, &names("c", 1025))
        .await
        .assert_json(400, json!({"error": LIMIT_MESSAGE}));
    assert_eq!(
        gw.metrics().await.value("sse_gateway_channels", &[]),
        1024.0
    );
}

/// The request that took 10 s of CPU before (100k names for one token) is now refused after
/// looking at 1025 of them; the gateway's CPU time shows it (a quadratic join would be seconds).
#[tokio::test]
async fn a_subscribe_of_100k_names_is_refused_cheaply() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let (_stream, token) = gw.open(&mut backend, "/huge").await;
    let cpu_before = gw.cpu_time();
    for _ in 0..5 {
        subscribe(&gw, &token, &names("n", 100_000))
            .await
            .assert_json(400, json!({"error": LIMIT_MESSAGE}));
    }
    let cpu = gw.cpu_time() - cpu_before;
    // Five 1.9 MB bodies read and parsed: tens of milliseconds in a debug build.
    assert!(
        cpu < Duration::from_secs(3),
        "5 refusals cost {cpu:?} of CPU"
    );
    assert_eq!(gw.metrics().await.value("sse_gateway_channels", &[]), 0.0);
}

/// A connect answer over the limit is invalid channels: 502 for the client, and the backend,
/// which said 2xx, gets its disconnect.
#[tokio::test]
async fn a_connect_answer_over_the_limit_is_invalid_channels() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_CHANNELS_PER_STREAM", "3")
        .spawn()
        .await;
    backend.on_connect(Reply::ok().body(json!({"channels": ["a", "b", "c"]}).to_string()));
    let (_stream, _token) = gw.open(&mut backend, "/three").await;
    backend.on_connect(Reply::ok().body(json!({"channels": ["a", "b", "c", "d"]}).to_string()));
    let refused = timeout(SOON, http::open_stream(gw.addr, "/four"))
        .await
        .expect("answer");
    let refused = refused.err().expect("refused");
    refused.assert_json(502, json!({"error": "Backend returned invalid channels"}));
    let cb = backend.next_connect().await;
    backend.next_disconnect(cb.token(), "error").await;
}
