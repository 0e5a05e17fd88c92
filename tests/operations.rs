//! PROTOCOL §7: operations — metrics series and their movement, log line shape and content,
//! and the SIGTERM/SIGINT drain (readyz draining, clean ends, one server_closed each, exit 0).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::http::{get, open_stream, HttpConn};
use common::{down_url, is_log_line, Backend, End, Gateway, Reply, SOON};
use serde_json::json;
use tokio::time::Instant;

#[tokio::test]
async fn metrics_name_the_series_and_counts_move() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .spawn()
        .await;
    let m = gw.metrics().await;
    for (name, kind) in [
        ("sse_gateway_connections", "gauge"),
        ("sse_gateway_connections_total", "counter"),
        ("sse_gateway_events_sent_total", "counter"),
        ("sse_gateway_bytes_sent_total", "counter"),
    ] {
        assert_eq!(
            m.get(name, &[]),
            Some(0.0),
            "{name} starts at 0:\n{}",
            m.text
        );
        let type_line = format!("# TYPE {name} {kind}");
        let family = name.trim_end_matches("_total");
        assert!(
            m.text.contains(&type_line) || m.text.contains(&format!("# TYPE {family} {kind}")),
            "no {type_line:?}:\n{}",
            m.text
        );
    }
    assert!(
        m.text
            .contains("# TYPE sse_gateway_callback_duration_seconds histogram"),
        "{}",
        m.text
    );

    let (mut s1, t1) = gw.open(&mut backend, "/m1").await;
    let (s2, t2) = gw.open(&mut backend, "/m2").await;
    gw.wait_metrics(SOON, |m| {
        m.get("sse_gateway_connections", &[]) == Some(2.0)
            && m.get("sse_gateway_connections_total", &[]) == Some(2.0)
    })
    .await;

    gw.send_ok(&json!({"token": t1, "event": {"data": "hello"}}))
        .await;
    assert_eq!(s1.next_event(SOON).await.data, "hello");
    let frame_len = "data: hello\n\n".len() as f64;
    gw.wait_metrics(SOON, |m| {
        m.get("sse_gateway_events_sent_total", &[]) == Some(1.0)
            && m.value("sse_gateway_bytes_sent_total", &[]) >= frame_len
    })
    .await;

    gw.send_ok(&json!({"token": t1, "close": true})).await;
    backend.next_disconnect(&t1, "server_closed").await;
    drop(s2);
    backend.next_disconnect(&t2, "client_closed").await;
    let m = gw
        .wait_metrics(SOON, |m| {
            m.get("sse_gateway_connections", &[]) == Some(0.0)
                && m.value(
                    "sse_gateway_disconnects_total",
                    &[("reason", "server_closed")],
                ) == 1.0
                && m.value(
                    "sse_gateway_disconnects_total",
                    &[("reason", "client_closed")],
                ) == 1.0
                && m.value(
                    "sse_gateway_callback_duration_seconds_count",
                    &[("action", "disconnect")],
                ) == 2.0
        })
        .await;
    assert_eq!(m.get("sse_gateway_connections_total", &[]), Some(2.0));
    assert_eq!(
        m.value("sse_gateway_disconnects_total", &[("reason", "error")]),
        0.0
    );
    // The latency histogram, per action.
    let count = m.get(
        "sse_gateway_callback_duration_seconds_count",
        &[("action", "connect")],
    );
    assert_eq!(count, Some(2.0), "{}", m.text);
    assert_eq!(
        m.get(
            "sse_gateway_callback_duration_seconds_bucket",
            &[("action", "connect"), ("le", "+Inf")]
        ),
        Some(2.0),
        "{}",
        m.text
    );
    let sum = m
        .get(
            "sse_gateway_callback_duration_seconds_sum",
            &[("action", "connect")],
        )
        .expect("histogram _sum");
    assert!((0.0..5.0).contains(&sum), "sum {sum}");
    assert_eq!(
        m.value(
            "sse_gateway_callback_errors_total",
            &[("action", "connect")]
        ),
        0.0
    );
}

#[tokio::test]
async fn callback_errors_are_counted_per_action() {
    let gw = Gateway::builder()
        .env("CALLBACK_URL", down_url())
        .spawn()
        .await;
    for _ in 0..2 {
        let r = open_stream(gw.addr, "/x").await.err().expect("refused");
        assert_eq!(r.status(), 503);
    }
    let m = gw
        .wait_metrics(SOON, |m| {
            m.value(
                "sse_gateway_callback_errors_total",
                &[("action", "connect")],
            ) == 2.0
        })
        .await;
    assert_eq!(m.get("sse_gateway_connections", &[]), Some(0.0));
    // Each failed callback is logged (after the start-up lines), in the log line shape.
    let lines = gw.logs.lines();
    let after_start: Vec<&String> = lines
        .iter()
        .filter(|l| !l.contains("listener on") && !l.contains("settings"))
        .collect();
    assert!(after_start.len() >= 2, "{lines:#?}");
    assert!(after_start.iter().all(|l| is_log_line(l)), "{lines:#?}");
}

#[tokio::test]
async fn log_lines_have_the_shape_and_name_the_token() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("LOG_LEVEL", "debug")
        .spawn()
        .await;
    let (mut s, token) = gw.open(&mut backend, "/logged").await;
    gw.logs
        .wait_for(|l| l.contains(&token), SOON)
        .await
        .expect("connection opened is logged with the token");
    gw.send_ok(&json!({"token": token, "event": {"data": "x"}}))
        .await;
    s.next_event(SOON).await;
    gw.logs
        .wait_for(|l| l.contains("[DEBUG]") && l.contains(&token), SOON)
        .await
        .expect("sends are logged at debug with the token");
    let before_close = gw.logs.lines().len();
    drop(s);
    backend.next_disconnect(&token, "client_closed").await;
    gw.logs
        .wait_for_from(before_close, |l| l.contains(&token), SOON)
        .await
        .expect("connection closed is logged with the token");
    let lines = gw.logs.lines();
    let bad: Vec<&String> = lines.iter().filter(|l| !is_log_line(l)).collect();
    assert!(
        bad.is_empty(),
        "lines not `<RFC3339> [LEVEL] message`: {bad:#?}"
    );
    assert!(lines
        .iter()
        .any(|l| l.contains("[INFO] public listener on http://127.0.0.1:")));
}

#[tokio::test]
async fn info_level_hides_debug_lines() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let (mut s, token) = gw.open(&mut backend, "/quiet").await;
    gw.send_ok(&json!({"token": token, "event": {"data": "x"}}))
        .await;
    s.next_event(SOON).await;
    gw.send_ok(&json!({"token": token, "close": true})).await;
    backend.next_disconnect(&token, "server_closed").await;
    gw.logs
        .wait_for(|l| l.contains(&token), SOON)
        .await
        .expect("the connection is logged at info");
    let lines = gw.logs.lines();
    assert!(lines.iter().all(|l| is_log_line(l)), "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("[DEBUG]")), "{lines:#?}");
}

/// A probe in flight when the signal comes (its request head not yet complete) must be
/// answered 503 draining; so must a fresh connection if the listener still accepts.
async fn readyz_during_drain(gw: &Gateway, probe: &mut HttpConn) -> bool {
    let draining = json!({"status": "draining", "configured": true});
    let mut seen = false;
    probe.write_all(b"\r\n").await.expect("complete the probe");
    match probe.try_read_response("GET").await {
        Ok(r) => {
            r.assert_json(503, draining.clone());
            seen = true;
        }
        Err(e) => eprintln!("in-flight probe got no answer: {e}"),
    }
    if let Ok(mut conn) = HttpConn::try_connect(gw.addr).await {
        if let Ok(r) = conn
            .try_request("GET", "/readyz", &[("Connection", b"close")], None)
            .await
        {
            r.assert_json(503, draining);
            seen = true;
        }
    }
    seen
}

async fn drain_on(signal: libc::c_int) {
    let mut backend = Backend::start().await;
    let mut gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "1")
        .spawn()
        .await;
    // A readiness probe in flight: its head is incomplete when the signal comes. It connects
    // before the streams below, so the gateway has accepted it (accept order) by the time they
    // are open.
    let mut probe = HttpConn::connect(gw.addr).await;
    probe
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    let mut streams = Vec::new();
    let mut tokens = HashSet::new();
    for i in 0..3 {
        let (s, t) = gw.open(&mut backend, &format!("/drain/{i}")).await;
        streams.push(s);
        tokens.insert(t);
    }
    get(gw.addr, "/readyz")
        .await
        .assert_json(200, json!({"status": "ready", "configured": true}));
    // Slow disconnect answers keep the drain (and so the draining readyz) observable.
    backend.on_disconnect(Reply::ok().delay(Duration::from_millis(1500)));

    gw.signal(signal);
    // A stream ending is the sign that the drain has begun.
    let (end, _) = streams[0].end(SOON).await;
    assert_eq!(end, End::Clean);
    let draining = readyz_during_drain(&gw, &mut probe).await;
    // New streams are not opened any more.
    if let Ok(mut conn) = HttpConn::try_connect(gw.addr).await {
        if let Ok(r) = conn.try_request("GET", "/late", &[], None).await {
            assert_ne!(r.status(), 200, "a stream opened during shutdown");
        }
    }
    for s in &mut streams {
        let (end, _) = s.end(SOON).await;
        assert_eq!(
            end,
            End::Clean,
            "every open stream ends with the chunked terminator"
        );
    }
    let mut got = HashSet::new();
    for _ in 0..3 {
        let cb = backend.next().await;
        assert_eq!(cb.action(), "disconnect", "{:?}", cb.body);
        assert_eq!(cb.reason(), Some("server_closed"), "{:?}", cb.body);
        assert!(got.insert(cb.token().to_owned()), "twice: {:?}", cb.body);
    }
    assert_eq!(got, tokens);
    let status = gw.wait_exit(Duration::from_secs(12)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        backend.try_next(Duration::ZERO).await.is_none(),
        "no connect for /late"
    );
    assert!(
        draining,
        "readyz never answered 503 draining after the signal"
    );
}

#[tokio::test]
async fn sigterm_drains_streams_and_exits_0() {
    drain_on(libc::SIGTERM).await;
}

#[tokio::test]
async fn sigint_drains_streams_and_exits_0() {
    drain_on(libc::SIGINT).await;
}

#[tokio::test]
async fn shutdown_is_bounded_by_the_grace_period() {
    let mut backend = Backend::start().await;
    let mut gw = Gateway::builder()
        .callback(&backend)
        .env("SHUTDOWN_GRACE_SECONDS", "1")
        .spawn()
        .await;
    let (mut s, token) = gw.open(&mut backend, "/stuck").await;
    // The backend never answers the disconnect callback in time.
    backend.on_disconnect(Reply::ok().delay(Duration::from_secs(60)));
    let started = Instant::now();
    gw.signal(libc::SIGTERM);
    assert_eq!(s.end(SOON).await.0, End::Clean);
    backend.next_disconnect(&token, "server_closed").await;
    let status = gw.wait_exit(Duration::from_secs(6)).await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "exit took {:?} with a 1 s grace",
        started.elapsed()
    );
}

#[tokio::test]
async fn sigterm_right_after_the_listener_line_is_a_clean_shutdown() {
    // An orchestrator may stop a gateway the moment it starts: once the gateway says it listens,
    // SIGTERM must be handled (drain, exit 0), not kill it by the default action.
    for _ in 0..5 {
        let mut gw = Gateway::builder().spawn().await;
        gw.signal(libc::SIGTERM);
        let status = gw.wait_exit(Duration::from_secs(5)).await;
        assert_eq!(status.code(), Some(0), "{status} right after start");
    }
}

#[tokio::test]
async fn idle_gateway_exits_promptly_on_sigterm() {
    let mut gw = Gateway::builder().spawn().await;
    get(gw.addr, "/healthz")
        .await
        .assert_json(200, json!({"status": "ok"}));
    let started = Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn at_the_descriptor_limit_accept_backs_off_and_recovers() {
    // Large enough that the callback pool's own sockets (up to 64 in flight) cannot eat all
    // the descriptors that closing half of the streams frees.
    const LIMIT: u64 = 256;
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .env("WORKER_THREADS", "2")
        .nofile_limit(LIMIT)
        .spawn()
        .await;
    // Open streams until the gateway stops answering new connections (or refuses them).
    let mut streams = Vec::new();
    let mut pending = None;
    let mut stale = String::new();
    for i in 0..LIMIT {
        let target = format!("/fd/{i}");
        match tokio::time::timeout(Duration::from_secs(2), open_stream(gw.addr, &target)).await {
            Ok(Ok(s)) => {
                backend.next_connect().await;
                streams.push(s);
            }
            Ok(Err(r)) => {
                assert_eq!(r.status(), 503, "at the limit: {}", r.text());
                break;
            }
            Err(_) => {
                // This request sits in the backlog: accept fails with EMFILE. Its bytes are
                // there too, so once accepted it may still make a connect callback (and then a
                // client_closed one): those are told apart by `stale`.
                stale = target;
                let mut conn = HttpConn::connect(gw.addr).await;
                conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                pending = Some(conn);
                break;
            }
        }
    }
    assert!(
        streams.len() as u64 > LIMIT / 2,
        "only {} streams under a limit of {LIMIT}",
        streams.len()
    );
    // No busy loop while descriptors are exhausted.
    let before = gw.cpu_time();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = gw.cpu_time() - before;
    assert!(
        used < window.elapsed() / 4,
        "gateway burned {used:?} CPU in {:?} at the descriptor limit",
        window.elapsed()
    );
    // Free descriptors (half the streams; the disconnect callbacks may open some backend
    // connections of their own): service resumes.
    let freed = streams.len() / 2;
    for s in streams.drain(..freed) {
        drop(s);
    }
    let mut disconnects = 0;
    while disconnects < freed {
        let cb = backend.next().await;
        if cb.url() == stale {
            continue;
        }
        assert_eq!(cb.action(), "disconnect", "{:?}", cb.body);
        disconnects += 1;
    }
    if let Some(mut conn) = pending {
        let r = tokio::time::timeout(Duration::from_secs(5), conn.try_read_response("GET"))
            .await
            .expect("the waiting connection is served once descriptors free up")
            .expect("response");
        r.assert_json(200, json!({"status": "ok"}));
    }
    let r = tokio::time::timeout(Duration::from_secs(5), get(gw.addr, "/healthz"))
        .await
        .expect("new connections are served again");
    r.assert_json(200, json!({"status": "ok"}));
    let mut s = open_stream(gw.addr, "/fd/after")
        .await
        .unwrap_or_else(|r| panic!("after recovery: {} {}", r.status(), r.text()));
    let token = loop {
        let cb = backend.next().await;
        if cb.url() == "/fd/after" {
            assert_eq!(cb.action(), "connect");
            break cb.token().to_owned();
        }
        assert_eq!(cb.url(), stale, "unexpected callback {:?}", cb.body);
    };
    gw.send_ok(&json!({"token": token, "event": {"data": "back"}}))
        .await;
    assert_eq!(s.next_event(SOON).await.data, "back");
}

#[tokio::test]
async fn connect_in_flight_at_shutdown_gets_exactly_one_disconnect() {
    let mut backend = Backend::start().await;
    let mut gw = Gateway::start(&backend).await;
    backend.on_connect(Reply::ok().delay(Duration::from_millis(800)));
    let addr = gw.addr;
    let client = tokio::spawn(async move {
        match open_stream(addr, "/late-accept").await {
            Ok(mut s) => Ok(s.end(SOON).await.0),
            Err(r) => Err(r.status()),
        }
    });
    let connect = backend.next_connect().await;
    gw.signal(libc::SIGTERM);
    // The backend said 2xx after the drain began: the token was accepted, so it gets its one
    // disconnect.
    backend
        .next_disconnect(connect.token(), "server_closed")
        .await;
    let outcome = tokio::time::timeout(SOON, client)
        .await
        .expect("the client is answered")
        .expect("client task");
    if let Ok(end) = outcome {
        assert_eq!(
            end,
            End::Clean,
            "a stream opened during the drain ends cleanly"
        );
    }
    let status = gw.wait_exit(Duration::from_secs(12)).await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(backend.try_next(Duration::ZERO).await.is_none());
}
