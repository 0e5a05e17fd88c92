//! PROTOCOL §8: channels — joining at connect, subscribe/unsubscribe, publish (validation, fan-out
//! once per stream, order with sends, close, a stalled member), cleanup, and the §1 rules on the new
//! routes. Real gateway binary, backend double answering channel lists, independent SSE parser.

mod common;

use std::time::Duration;

use common::http::{open_stream_with, request};
use common::{no_event_within, Backend, End, Gateway, Item, Reply, Response, SseStream, SOON};
use serde_json::{json, Value};
use tokio::net::TcpSocket;

const QUIET: Duration = Duration::from_millis(300);

/// Publishes and returns `delivered` from the 200 answer.
async fn publish(gw: &Gateway, body: Value) -> u64 {
    let r = gw.post("/internal/publish", &body).await;
    assert_eq!(r.status(), 200, "publish {body}: {}", r.text());
    let answer = r.json();
    assert_eq!(answer["status"], "ok", "{answer}");
    answer["delivered"]
        .as_u64()
        .unwrap_or_else(|| panic!("delivered is a count: {answer}"))
}

fn invalid(message: &str) -> Value {
    json!({ "error": format!("Invalid request: {message}") })
}

/// Opens `n` streams whose connect callbacks the backend answers with `channels`.
async fn open_in(
    gw: &Gateway,
    backend: &mut Backend,
    channels: &[&str],
    n: usize,
) -> Vec<(SseStream, String)> {
    backend.on_connect(Reply::ok().body(json!({ "channels": channels }).to_string()));
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        streams.push(gw.open(backend, &format!("/s/{i}")).await);
    }
    streams
}

#[tokio::test]
async fn a_publish_reaches_each_member_once_even_across_listed_channels() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut both = open_in(&gw, &mut backend, &["prices", "user.42"], 2).await;
    let mut prices_only = open_in(&gw, &mut backend, &["prices"], 1).await;
    let mut outsider = open_in(&gw, &mut backend, &["other"], 1).await;

    let delivered = publish(
        &gw,
        json!({"channels": ["prices", "user.42"], "event": {"name": "tick", "data": "1\n2", "id": "9"}}),
    )
    .await;
    assert_eq!(delivered, 3);
    for (stream, _) in both.iter_mut().chain(prices_only.iter_mut()) {
        let e = stream.next_event(SOON).await;
        assert_eq!((e.event.as_str(), e.data.as_str()), ("tick", "1\n2"));
        assert_eq!(e.last_event_id, "9");
        no_event_within(stream, QUIET).await;
    }
    no_event_within(&mut outsider[0].0, QUIET).await;

    assert_eq!(
        publish(
            &gw,
            json!({"channel": "user.42", "event": {"data": "only two"}})
        )
        .await,
        2
    );
    for (stream, _) in &mut both {
        assert_eq!(stream.next_event(SOON).await.data, "only two");
    }
    assert_eq!(
        publish(&gw, json!({"channel": "nobody", "event": {"data": "x"}})).await,
        0
    );
}

#[tokio::test]
async fn connect_answers_of_the_original_join_nothing() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut open = Vec::new();
    for body in ["", "OK", "{}", r#"{"ok":true}"#, "[1]"] {
        backend.on_connect(Reply::ok().body(body));
        let (mut stream, token) = gw.open(&mut backend, "/plain").await;
        gw.send_ok(&json!({"token": token, "event": {"data": body}}))
            .await;
        assert_eq!(stream.next_event(SOON).await.data, body, "answer {body:?}");
        open.push(stream);
    }
    let m = gw.metrics().await;
    assert_eq!(m.value("sse_gateway_channels", &[]), 0.0);
}

#[tokio::test]
async fn invalid_channels_in_a_2xx_answer_are_a_502_and_the_backend_gets_its_disconnect() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    for body in [
        r#"{"channels":"prices"}"#,
        r#"{"channels":[1]}"#,
        r#"{"channels":["has space"]}"#,
        r#"{"channels":[""]}"#,
        r#"{"channels":null}"#,
    ] {
        backend.on_connect(Reply::ok().body(body));
        let refused = match common::http::open_stream(gw.addr, "/bad").await {
            Ok(_) => panic!("answer {body} must not open a stream"),
            Err(r) => r,
        };
        refused.assert_json(502, json!({"error": "Backend returned invalid channels"}));
        let token = backend.next_connect().await.token().to_owned();
        backend.next_disconnect(&token, "error").await;
    }
    let long = "x".repeat(257);
    backend.on_connect(Reply::ok().body(json!({ "channels": [long] }).to_string()));
    let refused = common::http::open_stream(gw.addr, "/long").await.err();
    assert_eq!(refused.map(|r| r.status()), Some(502));
}

#[tokio::test]
async fn subscribe_and_unsubscribe_change_a_live_streams_channels() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let (mut stream, token) = gw.open(&mut backend, "/live").await;
    let ok = json!({"status": "ok"});

    let r = gw
        .post(
            "/internal/subscribe",
            &json!({"token": token, "channels": ["a", "b"]}),
        )
        .await;
    r.assert_json(200, ok.clone());
    // Joining twice is not an error.
    gw.post(
        "/internal/subscribe",
        &json!({"token": token, "channels": ["a"]}),
    )
    .await
    .assert_json(200, ok.clone());
    assert_eq!(
        publish(&gw, json!({"channel": "a", "event": {"data": "via a"}})).await,
        1
    );
    assert_eq!(stream.next_event(SOON).await.data, "via a");

    gw.post(
        "/internal/unsubscribe",
        &json!({"token": token, "channels": ["a", "never"]}),
    )
    .await
    .assert_json(200, ok.clone());
    assert_eq!(
        publish(&gw, json!({"channel": "a", "event": {"data": "x"}})).await,
        0
    );
    assert_eq!(
        publish(&gw, json!({"channel": "b", "event": {"data": "via b"}})).await,
        1
    );
    assert_eq!(stream.next_event(SOON).await.data, "via b");

    // One bad name refuses the whole request and changes nothing.
    let bad = gw
        .post(
            "/internal/subscribe",
            &json!({"token": token, "channels": ["c", "bad name"]}),
        )
        .await;
    assert_eq!(bad.status(), 400, "{}", bad.text());
    assert!(bad.json()["error"].as_str().unwrap().contains("channels"));
    assert_eq!(
        publish(&gw, json!({"channel": "c", "event": {"data": "x"}})).await,
        0
    );

    // Names are checked before the token: an unknown token with a bad name is a 400, not a 404.
    let unknown = "00000000-0000-4000-8000-000000000000";
    let r = gw
        .post(
            "/internal/subscribe",
            &json!({"token": unknown, "channels": [5]}),
        )
        .await;
    assert_eq!(r.status(), 400);
    for path in ["/internal/subscribe", "/internal/unsubscribe"] {
        gw.post(path, &json!({"token": unknown, "channels": ["a"]}))
            .await
            .assert_json(404, json!({"error": "Token not found"}));
        gw.post(path, &json!({"channels": ["a"]}))
            .await
            .assert_json(400, invalid("token is required and must be a string"));
        for channels in [json!("a"), json!(null), json!([""]), json!(["a b"])] {
            let r = gw
                .post(path, &json!({"token": token, "channels": channels}))
                .await;
            assert_eq!(r.status(), 400, "{path} {channels}: {}", r.text());
        }
        gw.post_raw(path, b"[]")
            .await
            .assert_json(400, invalid("body must be a JSON object"));
    }
}

#[tokio::test]
async fn publish_validation_comes_in_order_and_before_any_lookup() {
    let backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_SEND_BYTES", "1024")
        .spawn()
        .await;
    let target_message = |r: &Response| {
        assert_eq!(r.status(), 400, "{}", r.text());
        let message = r.json()["error"].as_str().unwrap().to_owned();
        assert!(message.starts_with("Invalid request: "), "{message}");
        assert!(message.contains("channel"), "{message}");
    };
    for body in [
        json!({"event": {"data": "x"}}),
        json!({"channel": "a", "channels": ["b"], "event": {"data": "x"}}),
        json!({"channels": [], "event": {"data": "x"}}),
        json!({"channels": "a", "event": {"data": "x"}}),
        json!({"channel": ["a"], "event": {"data": "x"}}),
        json!({"channel": "", "event": {"data": "x"}}),
        json!({"channel": "a b", "event": {"data": "x"}}),
        json!({"channels": ["ok", "caf\u{e9}"], "event": {"data": "x"}}),
        // The channel check comes before the event's.
        json!({"event": {"data": 5}}),
    ] {
        target_message(&gw.post("/internal/publish", &body).await);
    }
    let p = "/internal/publish";
    gw.post(p, &json!({"channel": "a", "event": []}))
        .await
        .assert_json(400, invalid("event must be an object"));
    gw.post(p, &json!({"channel": "a", "event": {"data": 1}}))
        .await
        .assert_json(400, invalid("event.data is required and must be a string"));
    gw.post(
        p,
        &json!({"channel": "a", "event": {"data": "x", "name": "a\nb"}}),
    )
    .await
    .assert_json(400, invalid("event.name must not contain CR or LF"));
    gw.post(
        p,
        &json!({"channel": "a", "event": {"data": "x"}, "close": "yes"}),
    )
    .await
    .assert_json(400, invalid("close must be a boolean"));
    gw.post(p, &json!({"channel": "a"}))
        .await
        .assert_json(400, invalid("event or close: true is required"));
    gw.post(p, &json!({"channel": "a", "close": false}))
        .await
        .assert_json(400, invalid("event or close: true is required"));
    gw.post_raw(p, b"not json")
        .await
        .assert_json(400, invalid("body must be a JSON object"));
    let big = json!({"channel": "a", "event": {"data": "x".repeat(2000)}});
    gw.post(p, &big)
        .await
        .assert_json(413, json!({"error": "Payload too large"}));
    // A valid close-only publish to an empty channel is fine.
    assert_eq!(
        publish(&gw, json!({"channel": "a", "close": true})).await,
        0
    );
    let m = gw.metrics().await;
    assert_eq!(m.value("sse_gateway_publishes_total", &[]), 1.0);
}

#[tokio::test]
async fn two_hundred_streams_get_twenty_publishes_in_order() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut streams = open_in(&gw, &mut backend, &["all"], 200).await;
    for round in 0..20 {
        let delivered = publish(
            &gw,
            json!({"channel": "all", "event": {"id": round.to_string(), "data": format!("round {round}")}}),
        )
        .await;
        assert_eq!(delivered, 200);
    }
    for (stream, token) in &mut streams {
        for round in 0..20 {
            let e = stream.next_event(SOON).await;
            assert_eq!(e.data, format!("round {round}"), "stream {token}");
            assert_eq!(e.last_event_id, round.to_string());
        }
    }
    let m = gw.metrics().await;
    assert_eq!(m.value("sse_gateway_publishes_total", &[]), 20.0);
    assert_eq!(m.value("sse_gateway_publish_deliveries_total", &[]), 4000.0);
    assert_eq!(m.value("sse_gateway_channels", &[]), 1.0);
}

#[tokio::test]
async fn sends_and_publishes_interleave_in_the_order_accepted() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut streams = open_in(&gw, &mut backend, &["all"], 3).await;
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); 3];
    for step in 0..60 {
        if step % 3 == 0 {
            let data = format!("publish {step}");
            assert_eq!(
                publish(&gw, json!({"channel": "all", "event": {"data": data}})).await,
                3
            );
            expected.iter_mut().for_each(|e| e.push(data.clone()));
        } else {
            let who = step % streams.len();
            let data = format!("send {step}");
            gw.send_ok(&json!({"token": streams[who].1, "event": {"data": data}}))
                .await;
            expected[who].push(data);
        }
    }
    for ((stream, _), want) in streams.iter_mut().zip(expected) {
        for data in want {
            assert_eq!(stream.next_event(SOON).await.data, data);
        }
    }
}

#[tokio::test]
async fn close_by_channel_ends_each_stream_once_with_server_closed() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut streams = open_in(&gw, &mut backend, &["room", "all"], 5).await;
    let delivered = publish(
        &gw,
        json!({"channels": ["room", "all"], "event": {"data": "bye"}, "close": true}),
    )
    .await;
    assert_eq!(delivered, 5);
    let mut tokens: Vec<String> = Vec::new();
    for (stream, token) in &mut streams {
        let (end, items) = stream.end(SOON).await;
        assert_eq!(end, End::Clean);
        let events: Vec<_> = items
            .into_iter()
            .filter_map(|i| match i {
                Item::Event(e) => Some(e.data),
                Item::Comment(_) => None,
            })
            .collect();
        assert_eq!(events, vec!["bye".to_string()]);
        tokens.push(token.clone());
    }
    let mut disconnected = Vec::new();
    for _ in 0..5 {
        let cb = backend.next().await;
        assert_eq!(cb.action(), "disconnect");
        assert_eq!(cb.reason(), Some("server_closed"));
        disconnected.push(cb.token().to_owned());
    }
    disconnected.sort();
    tokens.sort();
    assert_eq!(disconnected, tokens);
    backend.expect_none(QUIET).await;
    // The streams left both channels, which are gone; a second close reaches no one.
    assert_eq!(
        publish(&gw, json!({"channel": "room", "close": true})).await,
        0
    );
    gw.wait_metrics(SOON, |m| m.value("sse_gateway_channels", &[]) == 0.0)
        .await;
}

#[tokio::test]
async fn a_stalled_member_is_closed_and_the_others_still_get_every_frame() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_QUEUE_BYTES", "65536")
        .env("MAX_SEND_BYTES", "4194304")
        .spawn()
        .await;
    backend.on_connect(Reply::ok().body(r#"{"channels":["all"]}"#));
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let _stalled = open_with_socket(&gw, "/stalled", sock).await;
    let stalled_token = backend.next_connect().await.token().to_owned();
    let mut healthy = open_in(&gw, &mut backend, &["all"], 3).await;

    let data = "y".repeat(16 * 1024);
    let mut overflowed_at = None;
    for round in 0..200 {
        let delivered = publish(
            &gw,
            json!({"channel": "all", "event": {"id": round.to_string(), "data": data}}),
        )
        .await;
        // The healthy readers keep their sockets drained.
        for (stream, _) in &mut healthy {
            let e = stream.next_event(SOON).await;
            assert_eq!(e.last_event_id, round.to_string());
        }
        match delivered {
            4 => assert!(overflowed_at.is_none(), "the stalled stream came back"),
            3 => {
                overflowed_at.get_or_insert(round);
            }
            n => panic!("delivered {n} in round {round}"),
        }
        if overflowed_at.is_some_and(|at| round >= at + 3) {
            break;
        }
    }
    let at = overflowed_at.expect("a stalled member must overflow and be dropped");
    assert!(at >= 3, "overflowed too early, at round {at}");
    backend.next_disconnect(&stalled_token, "error").await;
    gw.send(&json!({"token": stalled_token, "event": {"data": "x"}}))
        .await
        .assert_json(404, json!({"error": "Token not found"}));
}

async fn open_with_socket(gw: &Gateway, target: &str, sock: TcpSocket) -> SseStream {
    match open_stream_with(gw.addr, target, &[], Some(sock)).await {
        Ok(s) => s,
        Err(r) => panic!("GET {target}: {} {}", r.status(), r.text()),
    }
}

#[tokio::test]
async fn a_disconnect_leaves_every_channel_and_empty_channels_disappear() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut streams = open_in(&gw, &mut backend, &["a", "b", "c"], 2).await;
    let (_, token) = &streams[0];
    gw.post(
        "/internal/subscribe",
        &json!({"token": token, "channels": ["d"]}),
    )
    .await
    .assert_json(200, json!({"status": "ok"}));
    gw.wait_metrics(SOON, |m| m.value("sse_gateway_channels", &[]) == 4.0)
        .await;

    let (first, first_token) = streams.remove(0);
    drop(first);
    backend.next_disconnect(&first_token, "client_closed").await;
    gw.wait_metrics(SOON, |m| m.value("sse_gateway_channels", &[]) == 3.0)
        .await;
    assert_eq!(
        publish(&gw, json!({"channel": "d", "event": {"data": "x"}})).await,
        0
    );
    assert_eq!(
        publish(&gw, json!({"channel": "a", "event": {"data": "x"}})).await,
        1
    );

    let (second, second_token) = streams.remove(0);
    drop(second);
    backend
        .next_disconnect(&second_token, "client_closed")
        .await;
    gw.wait_metrics(SOON, |m| m.value("sse_gateway_channels", &[]) == 0.0)
        .await;
}

/// 100k joins and 100k leaves over 20k distinct channel names: the channel count returns to zero
/// and the gateway's memory to near where it started (a leak of 20k channels would be megabytes).
#[tokio::test]
async fn membership_churn_leaves_nothing_behind() {
    let mut backend = Backend::start().await;
    // Each stream holds all 20k names at once: far past the default limit of 1024.
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_CHANNELS_PER_STREAM", "20000")
        .spawn()
        .await;
    let mut streams = open_in(&gw, &mut backend, &[], 5).await;
    let warm = |i: usize| format!("warm.{i}");
    // Warm the allocator with one full cycle first, so the comparison is steady state.
    let cycle = |names: Vec<String>| {
        let gw = &gw;
        let tokens: Vec<String> = streams.iter().map(|(_, t)| t.clone()).collect();
        async move {
            for token in &tokens {
                for chunk in names.chunks(1000) {
                    let body = json!({"token": token, "channels": chunk});
                    gw.post("/internal/subscribe", &body)
                        .await
                        .assert_json(200, json!({"status": "ok"}));
                }
            }
            let joined = gw.metrics().await.value("sse_gateway_channels", &[]);
            assert_eq!(joined, names.len() as f64);
            for token in &tokens {
                for chunk in names.chunks(1000) {
                    let body = json!({"token": token, "channels": chunk});
                    gw.post("/internal/unsubscribe", &body)
                        .await
                        .assert_json(200, json!({"status": "ok"}));
                }
            }
            assert_eq!(gw.metrics().await.value("sse_gateway_channels", &[]), 0.0);
        }
    };
    cycle((0..20_000).map(warm).collect()).await;
    let before = gw.rss_kib();
    // 5 streams × 20k names = 100k joins, then 100k leaves.
    cycle((0..20_000).map(|i| format!("churn.{i}")).collect()).await;
    let after = gw.rss_kib();
    assert!(
        after <= before + 4 * 1024,
        "RSS grew from {before} KiB to {after} KiB over a join/leave cycle"
    );
    // The streams still work and are in no channel.
    for (stream, token) in &mut streams {
        gw.send_ok(&json!({"token": token, "event": {"data": "still here"}}))
            .await;
        assert_eq!(stream.next_event(SOON).await.data, "still here");
    }
}

#[tokio::test]
async fn channel_routes_follow_the_internal_listener_and_secret() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("INTERNAL_PORT", "0")
        .env("INTERNAL_SECRET", "s3cret")
        .spawn()
        .await;
    backend.on_connect(Reply::ok().body(r#"{"channels":["all"]}"#));
    let (mut stream, token) = gw.open(&mut backend, "/x").await;
    let body = serde_json::to_vec(&json!({"channel": "all", "event": {"data": "hi"}})).unwrap();
    for path in [
        "/internal/publish",
        "/internal/subscribe",
        "/internal/unsubscribe",
    ] {
        let public = request(gw.addr, "POST", path, &[], Some(&body)).await;
        public.assert_json(404, json!({"error": "Not found"}));
        let internal = gw.internal.unwrap();
        let anonymous = request(internal, "POST", path, &[], Some(&body)).await;
        anonymous.assert_json(401, json!({"error": "Unauthorized"}));
        let wrong = request(
            internal,
            "POST",
            path,
            &[("Authorization", b"Bearer nope")],
            Some(&body),
        )
        .await;
        wrong.assert_json(401, json!({"error": "Unauthorized"}));
        let get = request(
            internal,
            "GET",
            path,
            &[("Authorization", b"Bearer s3cret")],
            None,
        )
        .await;
        assert_eq!(get.status(), 405);
        assert_eq!(get.header("allow").as_deref(), Some("POST"));
    }
    let authorized = request(
        gw.internal.unwrap(),
        "POST",
        "/internal/publish",
        &[("Authorization", b"Bearer s3cret")],
        Some(&body),
    )
    .await;
    authorized.assert_json(200, json!({"status": "ok", "delivered": 1}));
    assert_eq!(stream.next_event(SOON).await.data, "hi");
    let _ = token;
}
