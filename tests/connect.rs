//! PROTOCOL §2: opening a stream — the connect callback's payload, every callback outcome, the
//! stream's response headers, the connection limit, and the exactly-once rule around refused
//! connects and clients that leave while the connect callback is in flight.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::http::{open_stream, open_stream_with, HttpConn, NoItem};
use common::{down_url, is_uuid_v4, Backend, Gateway, Item, Reply, SOON};
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn connect_callback_carries_raw_url_and_headers() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let target = "/a%20b?x=1&y=%2F";
    let stream = open_stream_with(
        gw.addr,
        target,
        &[
            ("X-Multi", b"one"),
            ("x-multi", b"two"),
            ("Cookie", b"a=1"),
            ("Cookie", b"b=2"),
            ("X-Latin", b"caf\xe9"),
            ("User-Agent", b"sse-test/1.0"),
            ("X-Mixed-Case", b"Value Kept"),
        ],
        None,
    )
    .await
    .unwrap_or_else(|r| panic!("refused: {} {}", r.status(), r.text()));
    assert_eq!(stream.head.status, 200);

    let cb = backend.next_connect().await;
    assert_eq!(cb.method, "POST");
    assert_eq!(cb.path, Backend::PATH, "posted to CALLBACK_URL as given");
    let ct = cb.content_type.clone().unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");

    let body = cb.body.as_object().expect("JSON object");
    let keys: HashSet<&str> = body.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        HashSet::from(["action", "token", "request"]),
        "no reason key on connect: {body:?}"
    );
    assert_eq!(body["action"], "connect");
    assert!(is_uuid_v4(cb.token()), "token {:?}", cb.token());

    let request = body["request"].as_object().expect("request object");
    let keys: HashSet<&str> = request.keys().map(String::as_str).collect();
    assert_eq!(keys, HashSet::from(["url", "headers"]));
    assert_eq!(request["url"], target, "url exactly as received");

    let headers = request["headers"].as_object().expect("headers object");
    for (name, value) in headers {
        assert_eq!(name, &name.to_ascii_lowercase(), "lower-case names");
        assert!(value.is_string(), "{name}: {value:?} is not a string");
    }
    assert_eq!(headers["x-multi"], "one, two");
    assert_eq!(headers["cookie"], "a=1; b=2");
    assert_eq!(headers["x-latin"], "café", "ISO-8859-1 decoding");
    assert_eq!(headers["user-agent"], "sse-test/1.0");
    assert_eq!(headers["x-mixed-case"], "Value Kept", "values untouched");
    assert_eq!(headers["accept"], "text/event-stream");
    assert_eq!(headers["host"], gw.addr.to_string());
}

#[tokio::test]
async fn tokens_are_distinct_lowercase_uuid_v4() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut tokens = Vec::new();
    let mut streams = Vec::new();
    for i in 0..16 {
        let (s, token) = gw.open(&mut backend, &format!("/t/{i}")).await;
        assert!(is_uuid_v4(&token), "{token:?}");
        assert!(!tokens.contains(&token), "duplicate token {token}");
        tokens.push(token);
        streams.push(s);
    }
    // Random bits show no structure: no hex digit (other than the version) is the same in all
    // 16 tokens, and no two first groups are close (a counter or a slot number would be). For
    // random tokens either happens with probability below 1e-4.
    for pos in (0..36).filter(|p| ![8, 13, 14, 18, 19, 23].contains(p)) {
        let digits: HashSet<u8> = tokens.iter().map(|t| t.as_bytes()[pos]).collect();
        assert!(digits.len() > 1, "hex digit {pos} is constant: {tokens:#?}");
    }
    let firsts: Vec<i64> = tokens
        .iter()
        .map(|t| i64::from_str_radix(&t[..8], 16).unwrap())
        .collect();
    for (i, a) in firsts.iter().enumerate() {
        for b in &firsts[i + 1..] {
            assert!(
                (a - b).abs() >= 256,
                "first groups {a:08x} and {b:08x} are close: tokens look sequential: {tokens:#?}"
            );
        }
    }
}

#[tokio::test]
async fn callback_2xx_opens_the_stream() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut open = Vec::new();
    for (status, body) in [(200, r#"{"ok":true}"#), (201, ""), (204, ""), (299, "")] {
        backend.on_connect(Reply::status(status).body(body));
        let (mut stream, token) = gw.open(&mut backend, &format!("/ok/{status}")).await;
        assert_eq!(
            stream.head.status, 200,
            "backend {status} gives the client 200"
        );
        gw.send_ok(&json!({"token": token, "event": {"data": format!("hi {status}")}}))
            .await;
        assert_eq!(stream.next_event(SOON).await.data, format!("hi {status}"));
        open.push(stream);
    }
    backend.expect_none(QUIET).await;
}

/// Refusals: the status is passed through; the token is never open and gets no disconnect.
async fn assert_refusals(
    backend: &mut Backend,
    gw: &Gateway,
    statuses: &[u16],
    reply: impl Fn(u16) -> Reply,
) {
    let mut refused = Vec::new();
    for &status in statuses {
        backend.on_connect(reply(status));
        let r = open_stream(gw.addr, &format!("/refused/{status}"))
            .await
            .err()
            .unwrap_or_else(|| panic!("backend {status} must not open a stream"));
        r.assert_json(
            status,
            json!({"error": format!("Backend returned {status}")}),
        );
        let cb = backend.next_connect().await;
        refused.push(cb.token().to_owned());
        // The refused token is not open.
        gw.send(&json!({"token": cb.token(), "event": {"data": "x"}}))
            .await
            .assert_json(404, json!({"error": "Token not found"}));
    }
    // A marker stream's disconnect: any disconnect for a refused token would come before or
    // around it; then a quiet window.
    backend.on_connect(Reply::ok());
    let (stream, marker) = gw.open(backend, "/marker").await;
    drop(stream);
    let cb = backend.next().await;
    assert_eq!(cb.action(), "disconnect", "{:?}", cb.body);
    assert_eq!(
        cb.token(),
        marker,
        "refused tokens {refused:?} got a callback: {:?}",
        cb.body
    );
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn backend_status_is_passed_through_and_refused_tokens_get_no_disconnect() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    assert_refusals(
        &mut backend,
        &gw,
        &[400, 401, 403, 404, 429, 500, 502, 503],
        |s| Reply::status(s).body(r#"{"error":"backend says no"}"#),
    )
    .await;
}

#[tokio::test]
async fn redirects_are_passed_through_not_followed() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let location = format!("http://{}/followed", backend.addr);
    // If a redirect were followed the double would record a request to /followed (and the
    // marker check inside would see it).
    assert_refusals(&mut backend, &gw, &[301, 302, 303, 307, 308], |s| {
        Reply::status(s).header("Location", &location)
    })
    .await;
}

#[tokio::test]
async fn callback_timeout_is_504() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("CALLBACK_TIMEOUT_MS", "300")
        .spawn()
        .await;
    backend.on_connect(Reply::ok().delay(Duration::from_secs(4)));
    let started = Instant::now();
    let r = timeout(Duration::from_secs(3), open_stream(gw.addr, "/slow"))
        .await
        .expect("a 504 well before the backend answers")
        .err()
        .expect("not a stream");
    let took = started.elapsed();
    r.assert_json(504, json!({"error": "Gateway timeout"}));
    assert!(
        took >= Duration::from_millis(250),
        "answered after {took:?}, before the timeout"
    );
    let cb = backend.next_connect().await;
    assert_eq!(cb.url(), "/slow");
}

#[tokio::test]
async fn backend_down_is_503() {
    let url = down_url();
    let gw = Gateway::builder()
        .env("CALLBACK_URL", url.clone())
        .spawn()
        .await;
    let r = timeout(Duration::from_secs(4), open_stream(gw.addr, "/x"))
        .await
        .expect("answered promptly")
        .err()
        .expect("not a stream");
    r.assert_json(503, json!({"error": "Backend unavailable"}));
    // The log says which URL failed and why, not just "Unavailable".
    let line = gw
        .logs
        .wait_for(|l| l.contains("stream refused"), SOON)
        .await
        .unwrap_or_else(|| panic!("no refusal logged: {:#?}", gw.logs.lines()));
    assert!(line.contains(&url), "{line}");
    assert!(line.contains("refused"), "{line}");
}

#[tokio::test]
async fn backend_dns_failure_is_503() {
    let gw = Gateway::builder()
        .env("CALLBACK_URL", "http://no-such-host.invalid/cb")
        .spawn()
        .await;
    let r = timeout(Duration::from_secs(8), open_stream(gw.addr, "/x"))
        .await
        .expect("answered")
        .err()
        .expect("not a stream");
    r.assert_json(503, json!({"error": "Backend unavailable"}));
}

#[tokio::test]
async fn stream_headers_arrive_before_any_event() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "60")
        .spawn()
        .await;
    // Nothing will be sent and no heartbeat is due: the head must still arrive at once.
    let mut stream = timeout(
        Duration::from_secs(3),
        open_stream_with(gw.addr, "/h", &[("Accept-Encoding", b"gzip, br")], None),
    )
    .await
    .expect("response head flushed before any event")
    .unwrap_or_else(|r| panic!("refused {}", r.status()));
    let token = backend.next_connect().await.token().to_owned();
    assert_eq!(stream.head.status, 200);
    let ct = stream.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
    assert_eq!(stream.header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(
        stream
            .header("connection")
            .map(|c| c.to_ascii_lowercase())
            .as_deref(),
        Some("keep-alive")
    );
    assert_eq!(stream.header("x-accel-buffering").as_deref(), Some("no"));
    assert_eq!(stream.header("content-encoding"), None);
    assert_eq!(stream.header("content-length"), None);
    assert!(
        stream.head.is_chunked(),
        "HTTP/1.1 stream is chunked: {:?}",
        stream.head.headers
    );
    // No event was sent, so none may arrive.
    match stream.next_item(QUIET).await {
        Err(NoItem::Timeout) | Ok(Item::Comment(_)) => {}
        other => panic!("unexpected before any send: {other:?}"),
    }
    gw.send_ok(&json!({"token": token, "event": {"data": "first"}}))
        .await;
    assert_eq!(stream.next_event(SOON).await.data, "first");
}

#[tokio::test]
async fn client_leaving_during_connect_callback_gets_one_client_closed_after_the_2xx() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let delay = Duration::from_millis(1200);
    backend.on_connect(Reply::ok().delay(delay));
    let mut conn = HttpConn::connect(gw.addr).await;
    conn.write_all(b"GET /leaving?x=1 HTTP/1.1\r\nHost: gw\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let connect = backend.next_connect().await;
    drop(conn);
    let cb = backend
        .next_disconnect(connect.token(), "client_closed")
        .await;
    assert!(
        cb.at >= connect.at + delay - Duration::from_millis(50),
        "disconnect came {:?} after the connect, before the 2xx",
        cb.at - connect.at
    );
    assert_eq!(cb.body["request"], connect.body["request"]);
    backend.expect_none(Duration::from_millis(500)).await;
    gw.send(&json!({"token": connect.token(), "event": {"data": "x"}}))
        .await
        .assert_json(404, json!({"error": "Token not found"}));
}

#[tokio::test]
async fn client_leaving_during_a_refused_connect_gets_no_disconnect() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    backend.on_connect(Reply::status(403).delay(Duration::from_millis(600)));
    let mut conn = HttpConn::connect(gw.addr).await;
    conn.write_all(b"GET /leaving HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let connect = backend.next_connect().await;
    drop(conn);
    backend.expect_none(Duration::from_millis(1200)).await;
    assert!(!connect.token().is_empty());
}

#[tokio::test]
async fn max_connections_refuses_with_503_and_no_callback() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_CONNECTIONS", "2")
        .spawn()
        .await;
    let (s1, t1) = gw.open(&mut backend, "/one").await;
    let (_s2, _t2) = gw.open(&mut backend, "/two").await;
    for _ in 0..3 {
        let r = open_stream(gw.addr, "/three")
            .await
            .err()
            .expect("over the limit");
        r.assert_json(503, json!({"error": "Too many connections"}));
    }
    backend.expect_none(QUIET).await;
    // Probes still answer at the limit.
    common::http::get(gw.addr, "/healthz")
        .await
        .assert_json(200, json!({"status": "ok"}));
    // A slot frees when a stream ends.
    drop(s1);
    backend.next_disconnect(&t1, "client_closed").await;
    let (_s3, _t3) = gw.open(&mut backend, "/three").await;
}

#[tokio::test]
async fn without_callback_url_streams_are_503_service_not_configured() {
    let gw = Gateway::builder().spawn().await;
    for target in ["/", "/events?x=1"] {
        let r = open_stream(gw.addr, target).await.err().expect("no stream");
        r.assert_json(503, json!({"error": "Service not configured"}));
    }
}

#[tokio::test]
async fn connect_request_headers_are_all_strings_even_when_empty() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let _s = open_stream_with(gw.addr, "/e", &[("X-Empty", b"")], None)
        .await
        .unwrap_or_else(|r| panic!("{}", r.status()));
    let cb = backend.next_connect().await;
    assert_eq!(cb.body["request"]["headers"]["x-empty"], Value::from(""));
}
