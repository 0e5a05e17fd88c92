//! PROTOCOL §12: `POST /internal/batch` — mixed operations in item order, per-item answers equal
//! to the single routes' (404, 400, 500 included) without stopping the rest, the item limit at the
//! bound and one past it, bodies of the wrong shape and over `MAX_SEND_BYTES` (nothing applied),
//! the secret and the internal listener, publish's `delivered`, and one write per stream per batch.
//! Real gateway binary, backend double, hand-written HTTP client, independent SSE parser.

mod common;

use std::time::Duration;

use common::http::{open_stream_with, request};
use common::{data_of_next, no_event_within, Backend, End, Gateway, Item, Reply, SOON};
use serde_json::{json, Value};
use tokio::net::TcpSocket;

const QUIET: Duration = Duration::from_millis(300);

/// Posts a batch of `items` and returns its results, after checking the 200 and their count.
#[track_caller]
fn batch<'a>(
    gw: &'a Gateway,
    items: &'a [Value],
) -> impl std::future::Future<Output = Vec<Value>> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let r = gw
            .post("/internal/batch", &json!({ "requests": items }))
            .await;
        assert_eq!(r.status(), 200, "{caller}: {}", r.text());
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        let answer = r.json();
        let results = answer["results"]
            .as_array()
            .unwrap_or_else(|| panic!("{caller}: no results array in {answer}"))
            .clone();
        assert_eq!(results.len(), items.len(), "{caller}: one result per item");
        results
    }
}

fn result(status: u16, body: Value) -> Value {
    json!({ "status": status, "body": body })
}

fn ok() -> Value {
    result(200, json!({"status": "ok"}))
}

fn not_found() -> Value {
    result(404, json!({"error": "Token not found"}))
}

fn send(token: &str, data: &str) -> Value {
    json!({"op": "send", "token": token, "event": {"data": data}})
}

/// A gateway without heartbeats in the way, and a backend.
async fn start() -> (Backend, Gateway) {
    let backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .spawn()
        .await;
    (backend, gw)
}

#[tokio::test]
async fn mixed_operations_apply_in_item_order() {
    let (mut backend, gw) = start().await;
    let (mut a, ta) = gw.open(&mut backend, "/a").await;
    backend.on_connect(Reply::ok().body(r#"{"channels":["room"]}"#));
    let (mut b, tb) = gw.open(&mut backend, "/b").await;

    let results = batch(
        &gw,
        &[
            send(&ta, "1 to a"),
            json!({"op": "subscribe", "token": ta, "channels": ["news"]}),
            json!({"op": "publish", "channel": "news", "event": {"data": "2 news"}}),
            json!({"op": "publish", "channels": ["room", "news"], "event": {"name": "n", "data": "3 both"}}),
            json!({"op": "unsubscribe", "token": ta, "channels": ["news"]}),
            json!({"op": "publish", "channel": "news", "event": {"data": "never"}}),
            send(&tb, "4 to b"),
        ],
    )
    .await;
    assert_eq!(
        results,
        vec![
            ok(),
            ok(),
            result(200, json!({"status": "ok", "delivered": 1})),
            result(200, json!({"status": "ok", "delivered": 2})),
            ok(),
            result(200, json!({"status": "ok", "delivered": 0})),
            ok(),
        ]
    );
    assert_eq!(
        data_of_next(&mut a, 3).await,
        ["1 to a", "2 news", "3 both"]
    );
    assert_eq!(data_of_next(&mut b, 2).await, ["3 both", "4 to b"]);
    no_event_within(&mut a, QUIET).await;
    no_event_within(&mut b, QUIET).await;

    let m = gw.metrics().await;
    assert_eq!(m.get("sse_gateway_batches_total", &[]), Some(1.0));
    assert_eq!(m.get("sse_gateway_batch_items_total", &[]), Some(7.0));
    assert_eq!(m.get("sse_gateway_publishes_total", &[]), Some(3.0));
    assert_eq!(
        m.get("sse_gateway_publish_deliveries_total", &[]),
        Some(3.0)
    );
    assert_eq!(m.get("sse_gateway_events_sent_total", &[]), Some(5.0));
}

#[tokio::test]
async fn events_for_one_token_arrive_in_item_order_across_many_items_and_batches() {
    let (mut backend, gw) = start().await;
    backend.on_connect(Reply::ok().body(r#"{"channels":["room"]}"#));
    let (mut a, ta) = gw.open(&mut backend, "/a").await;
    backend.on_connect(Reply::ok());
    let (mut b, tb) = gw.open(&mut backend, "/b").await;

    let mut want_a = Vec::new();
    let mut want_b = Vec::new();
    for round in 0..3 {
        let mut items = Vec::new();
        for i in 0..600 {
            let data = format!("{round}.{i}");
            match i % 3 {
                0 => {
                    items.push(send(&ta, &data));
                    want_a.push(data);
                }
                1 => {
                    items
                        .push(json!({"op": "publish", "channel": "room", "event": {"data": data}}));
                    want_a.push(data);
                }
                _ => {
                    items.push(send(&tb, &data));
                    want_b.push(data);
                }
            }
        }
        let results = batch(&gw, &items).await;
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r["status"], 200, "item {i}: {r}");
        }
    }
    assert_eq!(data_of_next(&mut a, want_a.len()).await, want_a);
    assert_eq!(data_of_next(&mut b, want_b.len()).await, want_b);
    no_event_within(&mut a, QUIET).await;
}

#[tokio::test]
async fn a_failing_item_does_not_stop_the_rest() {
    let (mut backend, gw) = start().await;
    let (mut a, ta) = gw.open(&mut backend, "/a").await;
    let (mut b, tb) = gw.open(&mut backend, "/b").await;
    let unknown = "00000000-0000-4000-8000-000000000000";

    let results = batch(
        &gw,
        &[
            send(&ta, "a1"),
            send(unknown, "lost"),
            json!({"op": "subscribe", "token": unknown, "channels": ["x"]}),
            send(&tb, "b1"),
            json!({"op": "send", "token": ta, "event": {"data": "a2"}, "close": true}),
            // The stream ended at the item before: as its own request, this would be 404 too.
            send(&ta, "after close"),
            send(&tb, "b2"),
        ],
    )
    .await;
    assert_eq!(
        results,
        vec![
            ok(),
            not_found(),
            not_found(),
            ok(),
            ok(),
            not_found(),
            ok()
        ]
    );
    let (end, items) = a.end(SOON).await;
    assert_eq!(end, End::Clean);
    let data: Vec<_> = items
        .iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(e.data.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(data, ["a1", "a2"]);
    backend.next_disconnect(&ta, "server_closed").await;
    assert_eq!(data_of_next(&mut b, 2).await, ["b1", "b2"]);
}

/// Each invalid item gets exactly what its own request gets from its route (asked here, not
/// copied), and the good items around it still run.
#[tokio::test]
async fn invalid_items_answer_as_their_own_requests_and_the_rest_run() {
    let (mut backend, gw) = start().await;
    let (mut a, ta) = gw.open(&mut backend, "/a").await;

    // (item, the route whose answer it must equal, the body that route gets)
    let cases: Vec<(Value, &str, Value)> = vec![
        (json!(42), "send", json!(42)),
        (json!(null), "send", json!(null)),
        (json!(["x"]), "publish", json!(["x"])),
        (json!({"op": "send"}), "send", json!({})),
        (
            json!({"op": "send", "token": ta, "event": {"data": 7}}),
            "send",
            json!({"token": ta, "event": {"data": 7}}),
        ),
        (
            json!({"op": "send", "token": ta, "event": {"data": "x", "name": "a\nb"}}),
            "send",
            json!({"token": ta, "event": {"data": "x", "name": "a\nb"}}),
        ),
        (
            json!({"op": "send", "token": ta, "close": "yes"}),
            "send",
            json!({"token": ta, "close": "yes"}),
        ),
        (
            json!({"op": "publish", "event": {"data": "x"}}),
            "publish",
            json!({"event": {"data": "x"}}),
        ),
        (
            json!({"op": "publish", "channel": "room"}),
            "publish",
            json!({"channel": "room"}),
        ),
        (
            json!({"op": "subscribe", "token": ta, "channels": ["bad name"]}),
            "subscribe",
            json!({"token": ta, "channels": ["bad name"]}),
        ),
        (
            json!({"op": "unsubscribe", "token": ta}),
            "unsubscribe",
            json!({"token": ta}),
        ),
    ];
    let mut items = vec![send(&ta, "first")];
    for (item, _, _) in &cases {
        items.push(item.clone());
        items.push(send(&ta, &format!("after {}", items.len())));
    }
    let results = batch(&gw, &items).await;
    for (k, (item, route, body)) in cases.iter().enumerate() {
        let single = gw.post(&format!("/internal/{route}"), body).await;
        assert_eq!(single.status(), 400, "{route} {body}: {}", single.text());
        assert_eq!(
            results[1 + 2 * k],
            result(single.status(), single.json()),
            "item {item}"
        );
    }
    for k in (0..items.len()).step_by(2) {
        assert_eq!(results[k], ok(), "good item {k}");
    }
    let want: Vec<String> = (0..items.len())
        .step_by(2)
        .map(|k| match k {
            0 => "first".to_owned(),
            k => format!("after {k}"),
        })
        .collect();
    assert_eq!(data_of_next(&mut a, want.len()).await, want);
    no_event_within(&mut a, QUIET).await;

    // An item without a known op is 400 on its own (the route it would go to is unknown).
    let op_error = result(
        400,
        json!({"error": "Invalid request: op must be one of send, publish, subscribe, unsubscribe"}),
    );
    let results = batch(
        &gw,
        &[
            json!({"token": ta, "event": {"data": "no op"}}),
            json!({"op": "SEND", "token": ta, "event": {"data": "x"}}),
            json!({"op": "batch", "requests": []}),
            json!({"op": 1, "token": ta}),
            send(&ta, "last"),
        ],
    )
    .await;
    assert_eq!(
        results,
        vec![
            op_error.clone(),
            op_error.clone(),
            op_error.clone(),
            op_error,
            ok()
        ]
    );
    assert_eq!(a.next_event(SOON).await.data, "last");
    no_event_within(&mut a, QUIET).await;
}

#[tokio::test]
async fn the_item_limit_holds_at_the_default_bound_and_one_past_applies_nothing() {
    let (mut backend, gw) = start().await;
    let (mut a, ta) = gw.open(&mut backend, "/a").await;

    let items: Vec<Value> = (0..1000).map(|i| send(&ta, &i.to_string())).collect();
    let results = batch(&gw, &items).await;
    assert!(results.iter().all(|r| *r == ok()));
    let want: Vec<String> = (0..1000).map(|i: i32| i.to_string()).collect();
    assert_eq!(data_of_next(&mut a, 1000).await, want);

    let items: Vec<Value> = (0..1001).map(|i| send(&ta, &format!("x{i}"))).collect();
    let r = gw
        .post("/internal/batch", &json!({ "requests": items }))
        .await;
    r.assert_json(
        400,
        json!({"error": "Invalid request: a batch may hold at most 1000 requests (MAX_BATCH_ITEMS); nothing was applied"}),
    );
    no_event_within(&mut a, QUIET).await;
}

#[tokio::test]
async fn max_batch_items_sets_the_limit() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_BATCH_ITEMS", "3")
        .spawn()
        .await;
    let (mut a, ta) = gw.open(&mut backend, "/a").await;
    let three = [send(&ta, "1"), send(&ta, "2"), send(&ta, "3")];
    assert_eq!(batch(&gw, &three).await, vec![ok(), ok(), ok()]);
    assert_eq!(data_of_next(&mut a, 3).await, ["1", "2", "3"]);

    let four =
        json!({"requests": [send(&ta, "4"), send(&ta, "5"), send(&ta, "6"), send(&ta, "7")]});
    let r = gw.post("/internal/batch", &four).await;
    assert_eq!(r.status(), 400);
    let message = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        message.contains("at most 3") && message.contains("MAX_BATCH_ITEMS"),
        "{message}"
    );
    no_event_within(&mut a, QUIET).await;
    // An empty batch is a batch.
    assert!(batch(&gw, &[]).await.is_empty());
}

#[tokio::test]
async fn a_body_of_another_shape_is_400_and_applies_nothing() {
    let (mut backend, gw) = start().await;
    let (mut a, ta) = gw.open(&mut backend, "/a").await;
    let item = send(&ta, "never");
    let not_object = json!({"error": "Invalid request: body must be a JSON object"});
    let shape = json!({"error": "Invalid request: body must be {\"requests\":[...]}: an object whose requests is an array of operations"});
    let cases: Vec<(Vec<u8>, &Value)> = vec![
        (serde_json::to_vec(&json!([item])).unwrap(), &not_object),
        (b"\"requests\"".to_vec(), &not_object),
        (b"null".to_vec(), &not_object),
        (b"{\"requests\":[".to_vec(), &not_object),
        (b"not json".to_vec(), &not_object),
        (b"".to_vec(), &not_object),
        (b"{}".to_vec(), &shape),
        (
            serde_json::to_vec(&json!({"requests": {"0": item}})).unwrap(),
            &shape,
        ),
        (
            serde_json::to_vec(&json!({"requests": item})).unwrap(),
            &shape,
        ),
        (br#"{"requests":null}"#.to_vec(), &shape),
        (br#"{"requests":"[]"}"#.to_vec(), &shape),
        (
            serde_json::to_vec(&json!({"request": [item]})).unwrap(),
            &shape,
        ),
    ];
    for (body, want) in cases {
        let r = gw.post_raw("/internal/batch", &body).await;
        assert_eq!(
            (r.status(), r.json()),
            (400, want.clone()),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    no_event_within(&mut a, QUIET).await;
}

#[tokio::test]
async fn a_body_over_max_send_bytes_is_413_and_applies_nothing() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_SEND_BYTES", "2000")
        .spawn()
        .await;
    let (mut a, ta) = gw.open(&mut backend, "/a").await;
    let body_of = |len: usize, data: &str| {
        let mut body = serde_json::to_vec(&json!({"requests": [send(&ta, data)]})).unwrap();
        assert!(body.len() <= len);
        // JSON allows trailing white space: pad to exactly `len` bytes.
        body.resize(len, b' ');
        body
    };
    let r = gw
        .post_raw("/internal/batch", &body_of(2000, "at the bound"))
        .await;
    r.assert_json(200, json!({"results": [ok()]}));
    assert_eq!(a.next_event(SOON).await.data, "at the bound");

    let r = gw
        .post_raw("/internal/batch", &body_of(2001, "one past"))
        .await;
    r.assert_json(413, json!({"error": "Payload too large"}));
    no_event_within(&mut a, QUIET).await;
}

#[tokio::test]
async fn batch_needs_the_secret_and_lives_on_the_internal_listener() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("INTERNAL_PORT", "0")
        .env("INTERNAL_SECRET", "s3cret")
        .spawn()
        .await;
    let internal = gw.internal.expect("internal listener");
    let (mut a, ta) = gw.open(&mut backend, "/a").await;
    let body = serde_json::to_vec(&json!({"requests": [send(&ta, "hi")]})).unwrap();
    let post_with = |addr, auth: Option<&'static str>| {
        let body = body.clone();
        async move {
            let mut headers: Vec<(&str, &[u8])> = vec![("Content-Type", b"application/json")];
            if let Some(auth) = auth {
                headers.push(("Authorization", auth.as_bytes()));
            }
            request(addr, "POST", "/internal/batch", &headers, Some(&body)).await
        }
    };

    // On the public listener it does not exist, with or without the secret.
    let r = post_with(gw.addr, Some("Bearer s3cret")).await;
    r.assert_json(404, json!({"error": "Not found"}));
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cre"),
        Some("s3cret"),
    ] {
        let r = post_with(internal, auth).await;
        r.assert_json(401, json!({"error": "Unauthorized"}));
    }
    no_event_within(&mut a, QUIET).await;

    let r = post_with(internal, Some("bearer s3cret")).await;
    r.assert_json(200, json!({"results": [ok()]}));
    assert_eq!(a.next_event(SOON).await.data, "hi");

    let r = request(
        internal,
        "GET",
        "/internal/batch",
        &[("Authorization", b"Bearer s3cret")],
        None,
    )
    .await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.header("allow").as_deref(), Some("POST"));
}

#[tokio::test]
async fn publish_in_a_batch_counts_delivered_and_close_ends_the_members() {
    let (mut backend, gw) = start().await;
    backend.on_connect(Reply::ok().body(r#"{"channels":["room","all"]}"#));
    let mut room = Vec::new();
    for i in 0..3 {
        room.push(gw.open(&mut backend, &format!("/r{i}")).await);
    }
    backend.on_connect(Reply::ok().body(r#"{"channels":["all"]}"#));
    let (mut other, _) = gw.open(&mut backend, "/o").await;

    let results = batch(
        &gw,
        &[
            json!({"op": "publish", "channel": "room", "event": {"data": "r"}}),
            json!({"op": "publish", "channels": ["room", "all"], "event": {"data": "ra"}}),
            json!({"op": "publish", "channel": "nobody", "event": {"data": "x"}}),
            json!({"op": "publish", "channel": "room", "event": {"data": "bye"}, "close": true}),
            json!({"op": "publish", "channel": "all", "event": {"data": "left"}}),
        ],
    )
    .await;
    let delivered: Vec<Value> = results
        .iter()
        .map(|r| r["body"]["delivered"].clone())
        .collect();
    assert_eq!(
        delivered,
        [json!(3), json!(4), json!(0), json!(3), json!(1)]
    );
    assert!(results
        .iter()
        .all(|r| r["status"] == 200 && r["body"]["status"] == "ok"));

    for (stream, _) in &mut room {
        let (end, items) = stream.end(SOON).await;
        assert_eq!(end, End::Clean);
        let data: Vec<_> = items
            .iter()
            .filter_map(|i| match i {
                Item::Event(e) => Some(e.data.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(data, ["r", "ra", "bye"]);
    }
    // One server_closed each, in whatever order the callbacks are sent.
    let mut closed = Vec::new();
    for _ in 0..3 {
        let cb = backend.next().await;
        assert_eq!(
            (cb.action(), cb.reason()),
            ("disconnect", Some("server_closed"))
        );
        closed.push(cb.token().to_owned());
    }
    closed.sort();
    let mut tokens: Vec<String> = room.iter().map(|(_, t)| t.clone()).collect();
    tokens.sort();
    assert_eq!(closed, tokens);
    assert_eq!(data_of_next(&mut other, 2).await, ["ra", "left"]);
}

/// The frames one batch has for one stream leave in one `writev`: counted by the gateway's own
/// `sse_gateway_socket_writes_total` beside `sse_gateway_events_sent_total`, against the same
/// events sent one request each.
#[tokio::test]
async fn a_batch_writes_each_stream_once() {
    let (mut backend, gw) = start().await;
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(gw.open(&mut backend, &format!("/w{i}")).await);
    }
    let counts = |m: &common::Metrics| {
        (
            m.value("sse_gateway_socket_writes_total", &[]),
            m.value("sse_gateway_events_sent_total", &[]),
        )
    };

    // A frame read proves the stream's writer has the socket: before that (the head can reach the
    // client before the writer takes over), sends queue and leave together in one write.
    for (stream, token) in &mut streams {
        gw.send_ok(&json!({"token": token, "event": {"data": "warm"}}))
            .await;
        assert_eq!(data_of_next(stream, 1).await, ["warm"]);
    }
    let (writes0, events0) = counts(&gw.metrics().await);
    for i in 0..10 {
        gw.send_ok(&json!({"token": streams[0].1, "event": {"data": i.to_string()}}))
            .await;
    }
    assert_eq!(data_of_next(&mut streams[0].0, 10).await.len(), 10);
    let (writes1, events1) = counts(&gw.metrics().await);
    assert_eq!(events1 - events0, 10.0);
    assert_eq!(writes1 - writes0, 10.0, "one request, one write");

    let mut items = Vec::new();
    for i in 0..10 {
        for (_, token) in &streams {
            items.push(send(token, &format!("b{i}")));
        }
    }
    assert!(batch(&gw, &items).await.iter().all(|r| *r == ok()));
    let want: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    for (stream, _) in &mut streams {
        assert_eq!(data_of_next(stream, 10).await, want);
    }
    let (writes2, events2) = counts(&gw.metrics().await);
    assert_eq!(events2 - events1, 30.0);
    assert_eq!(
        writes2 - writes1,
        3.0,
        "30 frames to 3 idle streams: 3 writes"
    );
}

/// A client that does not read overflows its queue inside a batch as it would across single
/// sends: that item is 500, later items for it 404, and the other stream's items are unaffected.
/// Frames a batch queues for a reading client never overflow it, however many there are.
#[tokio::test]
async fn overflow_inside_a_batch_is_that_items_500() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_QUEUE_BYTES", "65536")
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .spawn()
        .await;
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let _stalled = open_stream_with(gw.addr, "/stalled", &[], Some(sock))
        .await
        .unwrap_or_else(|r| panic!("{}", r.status()));
    let stalled = backend.next_connect().await.token().to_owned();
    let (mut healthy, th) = gw.open(&mut backend, "/healthy").await;

    // 100 x 8 KiB to the reader in one batch: 800 KiB through a 64 KiB queue, all delivered.
    let data = "x".repeat(8192);
    let items: Vec<Value> = (0..100).map(|_| send(&th, &data)).collect();
    assert!(batch(&gw, &items).await.iter().all(|r| *r == ok()));
    for _ in 0..100 {
        assert_eq!(healthy.next_event(SOON).await.data.len(), 8192);
    }

    let overflow = result(500, json!({"error": "Write failed: connection closed"}));
    let mut seen = None;
    // 50 batches x 60 x 16 KiB = 48 MiB at most: far past 64 KiB and any socket buffer.
    let data = "y".repeat(16 * 1024);
    'batches: for round in 0..50 {
        let mut items = Vec::new();
        for _ in 0..60 {
            items.push(send(&stalled, &data));
            items.push(send(&th, &round.to_string()));
        }
        let results = batch(&gw, &items).await;
        for (i, r) in results.iter().enumerate().skip(1).step_by(2) {
            assert_eq!(*r, ok(), "the reader's item {i}");
        }
        for (i, r) in results.iter().enumerate().step_by(2) {
            if *r == overflow {
                assert!(
                    results[i + 2..]
                        .iter()
                        .step_by(2)
                        .all(|r| *r == not_found()),
                    "items after the overflow: {results:?}"
                );
                seen = Some(round);
                break 'batches;
            }
            assert_eq!(*r, ok(), "round {round} item {i}");
        }
    }
    assert!(seen.is_some(), "the stalled client never overflowed");
    backend.next_disconnect(&stalled, "error").await;
    // The reader got its frames of every round so far, in order.
    let last = seen.unwrap();
    for round in 0..=last {
        for _ in 0..60 {
            assert_eq!(healthy.next_event(SOON).await.data, round.to_string());
        }
    }
}
