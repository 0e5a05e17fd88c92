//! PROTOCOL §3: the stream — event frames byte for byte, data split on every SSE line break,
//! field injection contained, heartbeats, per-token order, and many concurrent streams.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::http::{open_stream, HttpConn};
use common::{Backend, End, Event, Gateway, Item, SseStream, SOON};
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A gateway whose heartbeats stay out of the way of byte-exact checks.
async fn quiet_gateway(backend: &Backend) -> Gateway {
    Gateway::builder()
        .callback(backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .spawn()
        .await
}

/// Sends `event` and returns the exact frame bytes the client got, plus the parsed event.
async fn frame_of(
    gw: &Gateway,
    stream: &mut SseStream,
    token: &str,
    event: Value,
) -> (String, Event) {
    let before = stream.payload.len();
    gw.send_ok(&json!({"token": token, "event": event})).await;
    let ev = stream.next_event(SOON).await;
    (
        String::from_utf8_lossy(&stream.payload[before..]).into_owned(),
        ev,
    )
}

#[tokio::test]
async fn event_frame_has_event_id_retry_then_data_lines() {
    let mut backend = Backend::start().await;
    let gw = quiet_gateway(&backend).await;
    let (mut s, token) = gw.open(&mut backend, "/f").await;

    let (raw, ev) = frame_of(
        &gw,
        &mut s,
        &token,
        json!({"name": "update", "id": "42", "retry": 5000, "data": "a\nb"}),
    )
    .await;
    assert_eq!(
        raw,
        "event: update\nid: 42\nretry: 5000\ndata: a\ndata: b\n\n"
    );
    assert_eq!(
        ev,
        Event {
            event: "update".into(),
            data: "a\nb".into(),
            last_event_id: "42".into(),
            retry: Some(5000)
        }
    );

    let (raw, ev) = frame_of(&gw, &mut s, &token, json!({"data": "plain"})).await;
    assert_eq!(raw, "data: plain\n\n", "no name: no event line");
    assert_eq!(ev.event, "message");
    assert_eq!(
        ev.last_event_id, "42",
        "the last event id persists client-side"
    );

    let (raw, _) = frame_of(&gw, &mut s, &token, json!({"name": "", "data": "x"})).await;
    assert_eq!(raw, "data: x\n\n", "empty name: no event line");

    let (raw, ev) = frame_of(&gw, &mut s, &token, json!({"id": "", "data": "reset"})).await;
    assert_eq!(
        raw, "id: \ndata: reset\n\n",
        "an empty id is given, so it is written"
    );
    assert_eq!(ev.last_event_id, "", "an empty id resets the last event id");

    let (raw, ev) = frame_of(&gw, &mut s, &token, json!({"retry": 0, "data": "r"})).await;
    assert_eq!(raw, "retry: 0\ndata: r\n\n");
    assert_eq!(ev.retry, Some(0));
}

#[tokio::test]
async fn data_is_split_on_crlf_cr_and_lf() {
    let mut backend = Backend::start().await;
    let gw = quiet_gateway(&backend).await;
    let (mut s, token) = gw.open(&mut backend, "/split").await;
    for (data, frame, parsed) in [
        (
            "a\r\nb\rc\nd",
            "data: a\ndata: b\ndata: c\ndata: d\n\n",
            "a\nb\nc\nd",
        ),
        ("a\r\n", "data: a\ndata: \n\n", "a\n"),
        ("\r\r", "data: \ndata: \ndata: \n\n", "\n\n"),
        ("x\n\ny", "data: x\ndata: \ndata: y\n\n", "x\n\ny"),
        ("\n\r", "data: \ndata: \ndata: \n\n", "\n\n"),
    ] {
        let (raw, ev) = frame_of(&gw, &mut s, &token, json!({"data": data})).await;
        assert_eq!(raw, frame, "data {data:?}");
        assert_eq!(ev.data, parsed, "data {data:?}");
    }
}

#[tokio::test]
async fn empty_data_is_one_empty_data_line() {
    let mut backend = Backend::start().await;
    let gw = quiet_gateway(&backend).await;
    let (mut s, token) = gw.open(&mut backend, "/empty").await;
    let (raw, ev) = frame_of(&gw, &mut s, &token, json!({"name": "ping", "data": ""})).await;
    assert!(
        raw == "event: ping\ndata: \n\n" || raw == "event: ping\ndata:\n\n",
        "frame {raw:?}"
    );
    assert_eq!(ev.event, "ping");
    assert_eq!(ev.data, "");
}

#[tokio::test]
async fn field_injection_through_data_stays_data() {
    let mut backend = Backend::start().await;
    let gw = quiet_gateway(&backend).await;
    let (mut s, token) = gw.open(&mut backend, "/inject").await;
    let evil = "x\n\nevent: evil\nid: 666\nretry: 1\r\n\r\ndata: y\r: comment";
    let (_, ev) = frame_of(&gw, &mut s, &token, json!({"data": evil})).await;
    assert_eq!(ev.event, "message");
    assert_eq!(
        ev.data,
        "x\n\nevent: evil\nid: 666\nretry: 1\n\ndata: y\n: comment"
    );
    assert_eq!(ev.last_event_id, "");
    assert_eq!(ev.retry, None);
    assert_eq!(s.comments(), 0);
    // And the stream continues with the next frame intact.
    let (raw, ev) = frame_of(&gw, &mut s, &token, json!({"name": "n", "data": "ok"})).await;
    assert_eq!(raw, "event: n\ndata: ok\n\n");
    assert_eq!(ev.data, "ok");
}

#[tokio::test]
async fn unicode_and_large_data_round_trip() {
    let mut backend = Backend::start().await;
    let gw = quiet_gateway(&backend).await;
    let (mut s, token) = gw.open(&mut backend, "/u").await;
    let text = "héllo ✓ 日本 🚀 \u{0} \t";
    let (_, ev) = frame_of(&gw, &mut s, &token, json!({"name": "ü", "data": text})).await;
    assert_eq!(ev.data, text);
    assert_eq!(ev.event, "ü");
    let big: String = (0..200_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let (_, ev) = frame_of(&gw, &mut s, &token, json!({"data": big})).await;
    assert_eq!(ev.data, big);
}

#[tokio::test]
async fn heartbeats_arrive_every_interval_and_are_not_reported() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "1")
        .spawn()
        .await;
    let (mut s, _token) = gw.open(&mut backend, "/hb").await;
    let opened = Instant::now();
    let mut arrivals = Vec::new();
    while arrivals.len() < 4 {
        match s.next_item(Duration::from_millis(2500)).await {
            Ok(Item::Comment(text)) => {
                assert_eq!(text, "heartbeat");
                arrivals.push(opened.elapsed());
            }
            other => panic!("expected a heartbeat, got {other:?} after {arrivals:?}"),
        }
    }
    assert!(
        arrivals[0] <= Duration::from_millis(1600),
        "first heartbeat within one interval: {arrivals:?}"
    );
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(500) && gap <= Duration::from_millis(1700),
            "heartbeats every ~1s: {arrivals:?}"
        );
    }
    let text = String::from_utf8_lossy(&s.payload).into_owned();
    assert_eq!(text, ": heartbeat\n\n".repeat(4), "exact heartbeat frames");
    // Heartbeats are never reported to the backend.
    assert!(backend.try_next(Duration::ZERO).await.is_none());
}

#[tokio::test]
async fn heartbeats_reach_every_stream_and_interleave_with_events() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "1")
        .spawn()
        .await;
    let mut streams = Vec::new();
    for i in 0..5 {
        streams.push(gw.open(&mut backend, &format!("/hb/{i}")).await);
    }
    for (s, token) in &mut streams {
        gw.send_ok(&json!({"token": token, "event": {"data": "e1"}}))
            .await;
        let mut heartbeats = 0;
        let mut events = Vec::new();
        while heartbeats == 0 || events.is_empty() {
            match s.next_item(Duration::from_millis(2500)).await {
                Ok(Item::Comment(c)) => {
                    assert_eq!(c, "heartbeat");
                    heartbeats += 1;
                }
                Ok(Item::Event(e)) => events.push(e.data),
                Err(why) => panic!("stream {token}: {why:?}, events {events:?}"),
            }
        }
        gw.send_ok(&json!({"token": token, "event": {"data": "e2"}}))
            .await;
        events.push(s.next_event(SOON).await.data);
        assert_eq!(events, ["e1", "e2"], "{token}");
    }
}

#[tokio::test]
async fn one_thousand_rapid_sends_arrive_in_order() {
    let mut backend = Backend::start().await;
    let gw = quiet_gateway(&backend).await;
    let (mut s, token) = gw.open(&mut backend, "/order").await;
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(1000);
        while got.len() < 1000 {
            got.push(s.next_event(Duration::from_secs(10)).await.data);
        }
        got
    });
    let mut conn = HttpConn::connect(gw.control_addr()).await;
    for i in 0..1000 {
        let body = serde_json::to_vec(
            &json!({"token": token, "event": {"id": i.to_string(), "data": format!("n{i}")}}),
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
        assert_eq!(r.status(), 200, "send {i}: {}", r.text());
    }
    let got = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("all events arrive")
        .expect("reader");
    let want: Vec<String> = (0..1000).map(|i| format!("n{i}")).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn sixty_concurrent_streams_each_get_their_own_events() {
    const N: usize = 60;
    let mut backend = Backend::start().await;
    let gw = quiet_gateway(&backend).await;
    let addr = gw.addr;
    let mut opening = JoinSet::new();
    for i in 0..N {
        opening.spawn(async move {
            let target = format!("/c/{i}");
            let s = open_stream(addr, &target)
                .await
                .unwrap_or_else(|r| panic!("{target}: {}", r.status()));
            (target, s)
        });
    }
    let mut tokens = HashMap::new();
    for _ in 0..N {
        let cb = backend.next_connect().await;
        tokens.insert(cb.url().to_owned(), cb.token().to_owned());
    }
    let mut streams = Vec::new();
    while let Some(r) = opening.join_next().await {
        streams.push(r.expect("open task"));
    }
    assert_eq!(tokens.len(), N);
    // Every stream gets two events naming its own path, then its own clean end.
    for round in 0..2 {
        for (url, token) in &tokens {
            gw.send_ok(&json!({"token": token, "event": {"name": "own", "data": format!("{url} {round}")}, "close": round == 1}))
                .await;
        }
    }
    let mut readers = JoinSet::new();
    for (target, mut s) in streams {
        readers.spawn(async move {
            let (end, items) = s.end(Duration::from_secs(10)).await;
            (target, end, items)
        });
    }
    while let Some(r) = readers.join_next().await {
        let (target, end, items) = r.expect("reader");
        assert_eq!(end, End::Clean, "{target}");
        let data: Vec<String> = items
            .into_iter()
            .map(|i| match i {
                Item::Event(e) => e.data,
                Item::Comment(c) => panic!("{target}: unexpected comment {c}"),
            })
            .collect();
        assert_eq!(
            data,
            [format!("{target} 0"), format!("{target} 1")],
            "{target}"
        );
    }
}
