//! PROTOCOL §6: configuration — every malformed value stops start-up with exit 2 naming the
//! variable; missing CALLBACK_URL is a state, not an error; the internal listener split and its
//! bearer secret.

mod common;

use std::time::Duration;

use common::http::{get, open_stream, request};
use common::{Backend, Gateway, SOON};
use serde_json::json;

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn malformed_values_exit_2_naming_the_variable() {
    let cases: &[(&str, &str)] = &[
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("PORT", "-1"),
        ("HOST", "999.1.1.1"),
        ("CALLBACK_URL", "ftp://x"),
        ("CALLBACK_URL", "not a url"),
        ("CALLBACK_URL", "https//missing-colon"),
        ("CALLBACK_TIMEOUT_MS", "abc"),
        ("CALLBACK_TIMEOUT_MS", "-5"),
        ("HEARTBEAT_INTERVAL_SECONDS", "0"),
        ("HEARTBEAT_INTERVAL_SECONDS", "1.5"),
        ("HEARTBEAT_INTERVAL_SECONDS", "x"),
        ("MAX_CONNECTIONS", "-1"),
        ("MAX_CONNECTIONS", "many"),
        ("MAX_QUEUE_BYTES", "-1"),
        ("MAX_QUEUE_BYTES", "1MB"),
        ("MAX_SEND_BYTES", "abc"),
        ("MAX_SEND_BYTES", "-1"),
        ("INTERNAL_PORT", "abc"),
        ("INTERNAL_PORT", "65536"),
        ("INTERNAL_HOST", "999.1.1.1"),
        ("SHUTDOWN_GRACE_SECONDS", "abc"),
        ("SHUTDOWN_GRACE_SECONDS", "-1"),
        ("LOG_LEVEL", "loud"),
        ("WORKER_THREADS", "0"),
        ("WORKER_THREADS", "abc"),
    ];
    let mut failures = Vec::new();
    for (var, value) in cases {
        let mut b = Gateway::builder().env("CALLBACK_URL", "http://127.0.0.1:9/cb");
        if var.starts_with("INTERNAL_HOST") {
            b = b.env("INTERNAL_PORT", "0");
        }
        failures.extend(b.refusal_problem(var, value).await);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn valid_unusual_values_start() {
    for (var, value) in [
        ("LOG_LEVEL", "debug"),
        ("WORKER_THREADS", "1"),
        ("MAX_CONNECTIONS", "0"),
        ("HEARTBEAT_INTERVAL_SECONDS", "1"),
        ("SHUTDOWN_GRACE_SECONDS", "1"),
    ] {
        let backend = Backend::start().await;
        let gw = Gateway::builder()
            .callback(&backend)
            .env(var, value)
            .spawn()
            .await;
        get(gw.addr, "/healthz")
            .await
            .assert_json(200, json!({"status": "ok"}));
    }
}

#[tokio::test]
async fn missing_callback_url_is_not_ready_and_refuses_streams() {
    let gw = Gateway::builder().spawn().await;
    get(gw.addr, "/readyz")
        .await
        .assert_json(503, json!({"status": "not_ready", "configured": false}));
    open_stream(gw.addr, "/x")
        .await
        .err()
        .expect("no stream")
        .assert_json(503, json!({"error": "Service not configured"}));
    get(gw.addr, "/healthz")
        .await
        .assert_json(200, json!({"status": "ok"}));
}

#[tokio::test]
async fn internal_listener_split() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("INTERNAL_PORT", "0")
        .spawn()
        .await;
    let internal = gw.internal.expect("internal listener");
    assert_ne!(internal, gw.addr);
    assert_eq!(
        internal.ip().to_string(),
        "127.0.0.1",
        "INTERNAL_HOST defaults to 127.0.0.1"
    );

    // Public port: /internal/* and /metrics are 404 and never streams.
    for (method, path) in [
        ("POST", "/internal/send"),
        ("GET", "/internal/send"),
        ("GET", "/internal/x"),
        ("GET", "/metrics"),
    ] {
        let body = (method == "POST").then_some(&br#"{"token":"x","close":true}"#[..]);
        request(gw.addr, method, path, &[], body)
            .await
            .assert_json(404, json!({"error": "Not found"}));
    }
    backend.expect_none(QUIET).await;
    get(gw.addr, "/healthz")
        .await
        .assert_json(200, json!({"status": "ok"}));

    // Internal port: probes, metrics and sends; anything else is 404, never a stream.
    get(internal, "/healthz")
        .await
        .assert_json(200, json!({"status": "ok"}));
    get(internal, "/readyz")
        .await
        .assert_json(200, json!({"status": "ready", "configured": true}));
    let m = get(internal, "/metrics").await;
    assert_eq!(m.status(), 200);
    assert!(m.text().contains("sse_gateway_connections"));
    for path in ["/", "/events", "/a?b=c"] {
        get(internal, path)
            .await
            .assert_json(404, json!({"error": "Not found"}));
    }
    backend.expect_none(QUIET).await;

    let (mut s, token) = gw.open(&mut backend, "/events").await;
    gw.send_ok(&json!({"token": token, "event": {"data": "via internal"}}))
        .await;
    assert_eq!(s.next_event(SOON).await.data, "via internal");
}

#[tokio::test]
async fn internal_secret_requires_the_bearer() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("INTERNAL_SECRET", "s3cret-value")
        .spawn()
        .await;
    let (mut s, token) = gw.open(&mut backend, "/sec").await;
    let body = serde_json::to_vec(&json!({"token": token, "event": {"data": "nope"}})).unwrap();
    let unauthorized = json!({"error": "Unauthorized"});
    for auth in [
        None,
        Some(&b"Bearer wrong"[..]),
        Some(&b"Bearer s3cret-valu"[..]),
        Some(&b"Bearer s3cret-value2"[..]),
        Some(&b"Basic czNjcmV0LXZhbHVl"[..]),
        Some(&b"s3cret-value"[..]),
        Some(&b"Bearer "[..]),
    ] {
        let mut headers: Vec<(&str, &[u8])> = vec![("Content-Type", b"application/json")];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        request(gw.addr, "POST", "/internal/send", &headers, Some(&body))
            .await
            .assert_json(401, unauthorized.clone());
    }
    // Authorization is checked before the body.
    request(gw.addr, "POST", "/internal/send", &[], Some(b"not json"))
        .await
        .assert_json(401, unauthorized.clone());
    request(gw.addr, "POST", "/internal/nope", &[], Some(b"{}"))
        .await
        .assert_json(401, unauthorized.clone());
    // The probes stay open.
    get(gw.addr, "/healthz")
        .await
        .assert_json(200, json!({"status": "ok"}));
    // The right bearer works (gw.send adds it).
    gw.send_ok(&json!({"token": token, "event": {"data": "yes"}}))
        .await;
    let ev = s.next_event(SOON).await;
    assert_eq!(ev.data, "yes", "the refused sends never reached the stream");
    let r = request(
        gw.addr,
        "POST",
        "/internal/send",
        &[("Authorization", b"Bearer s3cret-value")],
        Some(b"[]"),
    )
    .await;
    r.assert_json(
        400,
        json!({"error": "Invalid request: body must be a JSON object"}),
    );
}
