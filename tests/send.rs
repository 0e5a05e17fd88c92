//! PROTOCOL §4: `POST /internal/send` — every validation row in its order, 413, 404, no-ops,
//! event-then-close without deadlock, and the bounded queue of a stalled client.

mod common;

use std::time::Duration;

use common::http::{open_stream_with, HttpConn};
use common::{Backend, End, Gateway, Item, Reply, SOON};
use serde_json::json;
use tokio::net::TcpSocket;
use tokio::time::{timeout, Instant};

const QUIET: Duration = Duration::from_millis(300);

fn invalid(what: &str) -> serde_json::Value {
    json!({"error": format!("Invalid request: {what}")})
}

const NOT_OBJECT: &str = "body must be a JSON object";
const TOKEN: &str = "token is required and must be a string";
const EVENT: &str = "event must be an object";
const DATA: &str = "event.data is required and must be a string";
const NAME: &str = "event.name must be a string";
const NAME_CRLF: &str = "event.name must not contain CR or LF";
const ID: &str = "event.id must be a string";
const ID_CRLF: &str = "event.id must not contain CR, LF or NUL";
const RETRY: &str = "event.retry must be a non-negative integer";
const CLOSE: &str = "close must be a boolean";

/// `(body with {T} for an open token, expected message)`.
const ROWS: &[(&str, &str)] = &[
    ("not json", NOT_OBJECT),
    ("", NOT_OBJECT),
    ("[]", NOT_OBJECT),
    ("42", NOT_OBJECT),
    ("\"{T}\"", NOT_OBJECT),
    ("null", NOT_OBJECT),
    (
        "[{\"token\":\"{T}\",\"event\":{\"data\":\"x\"}}]",
        NOT_OBJECT,
    ),
    ("{\"token\":\"{T}\",\"event\":{\"data\":\"x\"}", NOT_OBJECT),
    ("{}", TOKEN),
    ("{\"event\":{\"data\":\"x\"}}", TOKEN),
    ("{\"token\":\"\"}", TOKEN),
    ("{\"token\":5}", TOKEN),
    ("{\"token\":null}", TOKEN),
    ("{\"token\":[\"{T}\"]}", TOKEN),
    ("{\"token\":\"{T}\",\"event\":null}", EVENT),
    ("{\"token\":\"{T}\",\"event\":[]}", EVENT),
    ("{\"token\":\"{T}\",\"event\":[{\"data\":\"x\"}]}", EVENT),
    ("{\"token\":\"{T}\",\"event\":\"x\"}", EVENT),
    ("{\"token\":\"{T}\",\"event\":5}", EVENT),
    ("{\"token\":\"{T}\",\"event\":true}", EVENT),
    ("{\"token\":\"{T}\",\"event\":{}}", DATA),
    ("{\"token\":\"{T}\",\"event\":{\"data\":5}}", DATA),
    ("{\"token\":\"{T}\",\"event\":{\"data\":null}}", DATA),
    ("{\"token\":\"{T}\",\"event\":{\"data\":[\"a\"]}}", DATA),
    ("{\"token\":\"{T}\",\"event\":{\"name\":\"n\"}}", DATA),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"name\":5}}",
        NAME,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"name\":null}}",
        NAME,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"name\":{}}}",
        NAME,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"name\":\"a\\nb\"}}",
        NAME_CRLF,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"name\":\"a\\rb\"}}",
        NAME_CRLF,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"name\":\"evil\\r\\nid: 1\"}}",
        NAME_CRLF,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"name\":\"\\n\"}}",
        NAME_CRLF,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"id\":5}}",
        ID,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"id\":null}}",
        ID,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"id\":true}}",
        ID,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"id\":\"1\\n2\"}}",
        ID_CRLF,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"id\":\"1\\r\"}}",
        ID_CRLF,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"id\":\"a\\u0000b\"}}",
        ID_CRLF,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"id\":\"1\\r\\nevent: x\"}}",
        ID_CRLF,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"retry\":-1}}",
        RETRY,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"retry\":1.5}}",
        RETRY,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"retry\":\"5\"}}",
        RETRY,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"retry\":null}}",
        RETRY,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"retry\":true}}",
        RETRY,
    ),
    ("{\"token\":\"{T}\",\"close\":\"yes\"}", CLOSE),
    ("{\"token\":\"{T}\",\"close\":\"true\"}", CLOSE),
    ("{\"token\":\"{T}\",\"close\":1}", CLOSE),
    ("{\"token\":\"{T}\",\"close\":null}", CLOSE),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\"},\"close\":0}",
        CLOSE,
    ),
    // A body failing several checks gets the earliest row's message.
    ("{\"token\":5,\"event\":null,\"close\":\"x\"}", TOKEN),
    ("{\"token\":\"{T}\",\"event\":5,\"close\":\"x\"}", EVENT),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":5,\"name\":5,\"retry\":-1}}",
        DATA,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"name\":5,\"id\":5}}",
        NAME,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"name\":\"a\\nb\",\"id\":\"1\\n\"}}",
        NAME_CRLF,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"id\":\"1\\n\",\"retry\":-1}}",
        ID_CRLF,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"id\":5,\"retry\":-1}}",
        ID,
    ),
    (
        "{\"token\":\"{T}\",\"event\":{\"data\":\"d\",\"retry\":-1},\"close\":\"x\"}",
        RETRY,
    ),
    // Validation comes before the token lookup.
    ("{\"token\":\"not-open\",\"close\":\"x\"}", CLOSE),
    ("{\"token\":\"not-open\",\"event\":{\"data\":5}}", DATA),
];

#[tokio::test]
async fn every_validation_row_in_order() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let (mut s, token) = gw.open(&mut backend, "/v").await;
    let mut failures = Vec::new();
    for (body, message) in ROWS {
        let body = body.replace("{T}", &token);
        let r = gw.send_raw(body.as_bytes()).await;
        let ct = r.header("content-type").unwrap_or_default();
        if r.status() != 400
            || !ct.starts_with("application/json")
            || serde_json::from_slice::<serde_json::Value>(&r.body).ok() != Some(invalid(message))
        {
            failures.push(format!(
                "{body}\n    want 400 {}\n    got  {} {} ({ct})",
                invalid(message),
                r.status(),
                r.text()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // None of the refused requests reached the stream or closed it.
    gw.send_ok(&json!({"token": token, "event": {"data": "after"}}))
        .await;
    assert_eq!(s.next_event(SOON).await.data, "after");
    assert_eq!(s.comments(), 0);
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn accepted_edge_values() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .spawn()
        .await;
    let (mut s, token) = gw.open(&mut backend, "/edge").await;
    for (event, data) in [
        (json!({"data": "r0", "retry": 0}), "r0"),
        (json!({"data": "rbig", "retry": 86_400_000u64}), "rbig"),
        (json!({"data": "tab", "name": "a\tb", "id": "ü 1"}), "tab"),
        (json!({"data": "unknown", "extra": {"x": 1}}), "unknown"),
    ] {
        gw.send_ok(&json!({"token": token, "event": event, "ignored": [1, 2]}))
            .await;
        assert_eq!(s.next_event(SOON).await.data, data);
    }
    // An unknown top-level field with only a token: a no-op.
    gw.send_ok(&json!({"token": token, "whatever": true})).await;
    gw.send_ok(&json!({"token": token, "event": {"data": "last"}}))
        .await;
    assert_eq!(s.next_event(SOON).await.data, "last");
}

#[tokio::test]
async fn token_only_is_a_noop_and_close_false_keeps_the_stream() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .spawn()
        .await;
    let (mut s, token) = gw.open(&mut backend, "/noop").await;
    gw.send_ok(&json!({"token": token})).await;
    gw.send_ok(&json!({"token": token, "close": false})).await;
    gw.send_ok(&json!({"token": token, "event": {"data": "kept"}, "close": false}))
        .await;
    assert_eq!(s.next_event(SOON).await.data, "kept");
    assert_eq!(s.payload, b"data: kept\n\n", "the no-ops wrote nothing");
    assert_eq!(s.ended(), None);
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn unknown_and_closed_tokens_are_404() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    for token in ["00000000-0000-4000-8000-000000000000", "x", "NOT-A-UUID"] {
        gw.send(&json!({"token": token, "event": {"data": "x"}}))
            .await
            .assert_json(404, json!({"error": "Token not found"}));
        gw.send(&json!({"token": token, "close": true}))
            .await
            .assert_json(404, json!({"error": "Token not found"}));
    }
    let (mut s, token) = gw.open(&mut backend, "/closing").await;
    // A token differing in one digit is another token.
    let mut other = token.clone().into_bytes();
    other[35] = if other[35] == b'0' { b'1' } else { b'0' };
    let other = String::from_utf8(other).unwrap();
    gw.send(&json!({"token": other, "event": {"data": "x"}}))
        .await
        .assert_json(404, json!({"error": "Token not found"}));
    gw.send_ok(&json!({"token": token, "close": true})).await;
    assert_eq!(s.end(SOON).await.0, End::Clean);
    backend.next_disconnect(&token, "server_closed").await;
    gw.send(&json!({"token": token, "event": {"data": "late"}}))
        .await
        .assert_json(404, json!({"error": "Token not found"}));
    gw.send(&json!({"token": token, "close": true}))
        .await
        .assert_json(404, json!({"error": "Token not found"}));
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn body_over_max_send_bytes_is_413() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_SEND_BYTES", "1024")
        .spawn()
        .await;
    let (mut s, token) = gw.open(&mut backend, "/big").await;
    let padded = |len: usize, data: &str| {
        let mut b = serde_json::to_vec(&json!({"token": token, "event": {"data": data}})).unwrap();
        assert!(b.len() <= len);
        b.resize(len, b' ');
        b
    };
    // Exactly at the bound is accepted.
    let r = gw.send_raw(&padded(1024, "at-limit")).await;
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(s.next_event(SOON).await.data, "at-limit");
    // One byte over is refused, before any other check.
    gw.send_raw(&padded(1025, "over"))
        .await
        .assert_json(413, json!({"error": "Payload too large"}));
    gw.send_raw(&[b'x'; 1025])
        .await
        .assert_json(413, json!({"error": "Payload too large"}));
    // A chunked body without Content-Length is bounded too.
    let body = padded(2000, "chunked-over");
    let mut chunked = Vec::new();
    for part in body.chunks(500) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut conn = HttpConn::connect(gw.control_addr()).await;
    conn.request(
        "POST",
        "/internal/send",
        &[("Transfer-Encoding", b"chunked"), ("Connection", b"close")],
        Some(&chunked),
    )
    .await
    .assert_json(413, json!({"error": "Payload too large"}));
    // A small chunked body is fine.
    let small =
        serde_json::to_vec(&json!({"token": token, "event": {"data": "chunked-ok"}})).unwrap();
    let mut chunked = format!("{:x}\r\n", small.len()).into_bytes();
    chunked.extend_from_slice(&small);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let mut conn = HttpConn::connect(gw.control_addr()).await;
    let r = conn
        .request(
            "POST",
            "/internal/send",
            &[("Transfer-Encoding", b"chunked"), ("Connection", b"close")],
            Some(&chunked),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(s.next_event(SOON).await.data, "chunked-ok");
    // Nothing refused reached the stream.
    assert_eq!(s.payload, b"data: at-limit\n\ndata: chunked-ok\n\n");
}

#[tokio::test]
async fn declared_oversize_content_length_is_413_without_reading_the_body() {
    let backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_SEND_BYTES", "1024")
        .spawn()
        .await;
    let mut conn = HttpConn::connect(gw.control_addr()).await;
    conn.write_all(b"POST /internal/send HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{\"token\":")
        .await
        .unwrap();
    let r = timeout(Duration::from_secs(3), conn.try_read_response("POST"))
        .await
        .expect("413 without waiting for 10 MB")
        .expect("response");
    r.assert_json(413, json!({"error": "Payload too large"}));
}

#[tokio::test]
async fn event_then_close_answers_without_waiting_for_the_disconnect_callback() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .spawn()
        .await;
    let (mut s, token) = gw.open(&mut backend, "/bye").await;
    // A backend that cannot answer its disconnect callback for seconds (as a single-threaded
    // backend busy calling /internal/send would not).
    backend.on_disconnect(Reply::ok().delay(Duration::from_secs(6)));
    let started = Instant::now();
    let r = timeout(
        Duration::from_millis(1500),
        gw.send(&json!({"token": token, "event": {"name": "bye", "data": "last"}, "close": true})),
    )
    .await
    .expect("the send must be answered without waiting for the disconnect callback");
    r.assert_json(200, json!({"status": "ok"}));
    let ev = s.next_event(SOON).await;
    assert_eq!((ev.event.as_str(), ev.data.as_str()), ("bye", "last"));
    let (end, rest) = s.end(SOON).await;
    assert_eq!(end, End::Clean, "closed with the chunked terminator");
    assert!(rest.is_empty(), "nothing after the last event: {rest:?}");
    assert!(s.raw.ends_with(b"0\r\n\r\n"));
    assert_eq!(s.payload, b"event: bye\ndata: last\n\n");
    let cb = backend.next_disconnect(&token, "server_closed").await;
    assert!(cb.at - started < Duration::from_secs(3));
    backend.expect_none(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn close_only_ends_the_stream_cleanly() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .spawn()
        .await;
    let (mut s, token) = gw.open(&mut backend, "/close").await;
    gw.send_ok(&json!({"token": token, "close": true})).await;
    let (end, items) = s.end(SOON).await;
    assert_eq!(end, End::Clean);
    assert!(items.is_empty(), "{items:?}");
    assert!(
        s.payload.is_empty(),
        "close alone writes no frame: {:?}",
        s.payload
    );
    backend.next_disconnect(&token, "server_closed").await;
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn stalled_client_overflows_its_queue_without_growing_memory() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_QUEUE_BYTES", "1048576")
        .env("HEARTBEAT_INTERVAL_SECONDS", "1")
        .spawn()
        .await;
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stalled = open_stream_with(gw.addr, "/stalled", &[], Some(sock))
        .await
        .unwrap_or_else(|r| panic!("{}", r.status()));
    let stalled_token = backend.next_connect().await.token().to_owned();
    let (mut healthy, healthy_token) = gw.open(&mut backend, "/healthy").await;

    let data = "x".repeat(64 * 1024);
    let mut conn = HttpConn::connect(gw.control_addr()).await;
    let mut max_rss = gw.rss_kib();
    let mut refused_at = None;
    // Up to 4000 x 64 KiB = 250 MiB: far past the 1 MiB queue plus any socket buffers, and far
    // past the RSS bound should the queue be unbounded.
    for i in 0..4000u32 {
        let body = serde_json::to_vec(
            &json!({"token": stalled_token, "event": {"id": i.to_string(), "data": data}}),
        )
        .unwrap();
        let r = conn
            .request(
                "POST",
                "/internal/send",
                &[("Content-Type", b"application/json")],
                Some(&body),
            )
            .await;
        max_rss = max_rss.max(gw.rss_kib());
        assert!(
            max_rss < 200 * 1024,
            "gateway RSS reached {} MiB after {i} x 64 KiB to a stalled client (queue 1 MiB)",
            max_rss / 1024
        );
        match r.status() {
            200 => {}
            500 => {
                r.assert_json(500, json!({"error": "Write failed: connection closed"}));
                refused_at = Some(i);
                break;
            }
            s => panic!("send {i}: {s} {}", r.text()),
        }
        if i % 10 == 0 {
            gw.send_ok(&json!({"token": healthy_token, "event": {"data": format!("h{i}")}}))
                .await;
            assert_eq!(healthy.next_event(SOON).await.data, format!("h{i}"));
        }
    }
    let refused_at = refused_at.expect("a send to a stalled client must overflow its queue");
    eprintln!("overflow at send {refused_at} (64 KiB each); max RSS {max_rss} KiB");
    assert!(
        refused_at >= 16,
        "overflowed after only {refused_at} x 64 KiB (queue is 1 MiB)"
    );
    // The stream is closed: further sends find no token; one `error` disconnect.
    gw.send(&json!({"token": stalled_token, "event": {"data": "x"}}))
        .await
        .assert_json(404, json!({"error": "Token not found"}));
    backend.next_disconnect(&stalled_token, "error").await;
    // The other stream is unaffected.
    gw.send_ok(&json!({"token": healthy_token, "event": {"data": "still here"}}))
        .await;
    assert_eq!(healthy.next_event(SOON).await.data, "still here");
    // The stalled client, reading at last, sees whole frames in order and then an abort.
    let (end, items) = stalled.end(Duration::from_secs(20)).await;
    assert_eq!(
        end,
        End::Abrupt,
        "an overflowed stream is aborted, not ended cleanly"
    );
    let ids: Vec<u32> = items
        .iter()
        .filter_map(|i| match i {
            Item::Event(e) => {
                assert_eq!(e.data.len(), data.len());
                Some(e.last_event_id.parse().unwrap())
            }
            Item::Comment(_) => None,
        })
        .collect();
    assert_eq!(
        ids,
        (0..ids.len() as u32).collect::<Vec<_>>(),
        "frames in order, none torn"
    );
    assert!((ids.len() as u32) <= refused_at);
    backend.expect_none(QUIET).await;
}
