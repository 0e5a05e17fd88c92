//! PROTOCOL §10 and §10.1: three real gateway processes joined by one real Redis answer the
//! backend as one gateway would. Sends, subscribes and unsubscribes for a token held by another
//! node reach that node and come back with its answer; publish reaches every member on every node
//! once with the cluster-wide count; order per token through one node; close from another node;
//! the holder's errors (channel limit, queue overflow) come back unchanged; batches; metrics and
//! /readyz; traffic follows interest (one Redis subscription per node holding a member); §10.1's
//! `sse-gateway:` prefix, deployments kept apart by Redis database, a Redis with a password.
//! Which node holds a stream: the one whose public port the stream was opened on (its token comes
//! in the connect callback). Events carry sequence numbers, read through the independent SSE
//! parser, so a duplicate or a reordering shows.

mod common;

use std::time::Duration;

use common::cluster::{
    drain, expect_no_event, not_found, parse_seq, publish, publish_ok, ready_body, readyz,
    seq_data, wait_joined, Cluster, Sender, FORWARDED, NODES, REDIS_UP,
};
use common::http::open_stream_with;
use common::redis::Resp;
use common::{Backend, End, Gateway, Item, Redis, Reply, Response, SOON};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio::time::Instant;

/// A window in which an event that should not come would have come.
const QUIET: Duration = Duration::from_millis(400);
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

async fn three() -> Cluster {
    Cluster::start(3, |b| b).await
}

/// The same token with its last hex digit changed: same length, same shape, and (for a scheme
/// that routes by token) the same issuing node, but no stream.
fn mutate(token: &str) -> String {
    let (head, last) = token.split_at(token.len() - 1);
    format!("{head}{}", if last == "0" { "1" } else { "0" })
}

#[tokio::test]
async fn a_send_via_a_reaches_a_stream_on_c_in_the_order_a_accepted_it() {
    let mut cl = three().await;
    let (mut on_c, token) = cl.open_in(C, "/c/ordered", &[]).await;

    let r = cl.nodes[A]
        .send(&json!({"token": token, "event": {"name": "greeting", "data": "hello\nfrom A", "id": "7", "retry": 1500}}))
        .await;
    r.assert_json(200, json!({"status": "ok"}));
    let e = on_c.next_event(SOON).await;
    assert_eq!(
        (
            e.event.as_str(),
            e.data.as_str(),
            e.last_event_id.as_str(),
            e.retry
        ),
        ("greeting", "hello\nfrom A", "7", Some(1500))
    );

    // 1000 sends through A, one after the other on one keep-alive connection: each answered 200,
    // all arrive at C's stream in that order, none twice.
    let mut sender = Sender::connect(&cl.nodes[A]).await;
    let start = Instant::now();
    send_seq(&mut sender, "a", &token, 1000).await;
    eprintln!("1000 sends via A to a stream on C: {:?}", start.elapsed());
    let (got, _) = drain(&mut on_c, QUIET).await;
    let want: Vec<String> = (0..1000).map(|i| seq_data("a", i)).collect();
    assert_eq!(got.len(), 1000, "events at C: {got:?}");
    assert_eq!(got, want);

    // Through A and B at the same time: each node's sends keep that node's order.
    let (mut sa, mut sb) = (
        Sender::connect(&cl.nodes[A]).await,
        Sender::connect(&cl.nodes[B]).await,
    );
    tokio::join!(
        send_seq(&mut sa, "a", &token, 300),
        send_seq(&mut sb, "b", &token, 300)
    );
    let (got, _) = drain(&mut on_c, QUIET).await;
    assert_eq!(got.len(), 600, "{got:?}");
    for label in ["a", "b"] {
        let seqs: Vec<u64> = got
            .iter()
            .filter_map(|d| parse_seq(d).filter(|(l, _)| *l == label).map(|(_, s)| s))
            .collect();
        assert_eq!(
            seqs,
            (0..300).collect::<Vec<_>>(),
            "sends through node {label}"
        );
    }
}

/// `n` sends of `<label>#<i>` to `token`, one after the other, each answered 200.
async fn send_seq(sender: &mut Sender, label: &str, token: &str, n: u64) {
    for i in 0..n {
        sender
            .post(
                "/internal/send",
                &json!({"token": token, "event": {"data": seq_data(label, i)}}),
            )
            .await
            .assert_json(200, json!({"status": "ok"}));
    }
}

#[tokio::test]
async fn sends_and_publishes_through_one_node_keep_their_order_at_another() {
    let mut cl = three().await;
    let (mut on_c, token) = cl.open_in(C, "/c/mixed", &["mix"]).await;
    let mut sender = Sender::connect(&cl.nodes[A]).await;
    for i in 0..200u64 {
        let data = seq_data("m", i);
        let r = if i % 2 == 0 {
            sender
                .post(
                    "/internal/send",
                    &json!({"token": token, "event": {"data": data}}),
                )
                .await
        } else {
            sender
                .post(
                    "/internal/publish",
                    &json!({"channel": "mix", "event": {"data": data}}),
                )
                .await
        };
        assert_eq!(r.status(), 200, "item {i}: {}", r.text());
    }
    let (got, _) = drain(&mut on_c, QUIET).await;
    let want: Vec<String> = (0..200).map(|i| seq_data("m", i)).collect();
    assert_eq!(got, want, "per token, events through A arrive in A's order");
}

#[tokio::test]
async fn every_node_answers_unknown_tokens_and_bad_requests_as_one_gateway() {
    let mut cl = three().await;
    let single_backend = Backend::start().await;
    let single = Gateway::start(&single_backend).await;
    let (on_a, a_token) = cl.open_in(A, "/a/known", &[]).await;
    let (_on_c, c_token) = cl.open_in(C, "/c/known", &[]).await;

    let cases: Vec<(&str, Value)> = vec![
        (
            "/internal/send",
            json!({"token": "00000000-0000-4000-8000-000000000000", "event": {"data": "x"}}),
        ),
        (
            "/internal/send",
            json!({"token": "ffffffff-ffff-4fff-bfff-ffffffffffff", "event": {"data": "x"}}),
        ),
        (
            "/internal/send",
            json!({"token": "not-a-uuid", "event": {"data": "x"}}),
        ),
        (
            "/internal/send",
            json!({"token": "", "event": {"data": "x"}}),
        ),
        (
            "/internal/send",
            json!({"token": 5, "event": {"data": "x"}}),
        ),
        (
            "/internal/send",
            json!({"token": mutate(&c_token), "event": {"data": "x"}}),
        ),
        (
            "/internal/send",
            json!({"token": mutate(&a_token), "close": true}),
        ),
        (
            "/internal/send",
            json!({"token": c_token, "event": {"data": 1}}),
        ),
        (
            "/internal/send",
            json!({"token": c_token, "event": {"data": "x", "name": "a\nb"}}),
        ),
        ("/internal/send", json!({"token": c_token, "close": "yes"})),
        ("/internal/send", json!(["not", "an", "object"])),
        (
            "/internal/subscribe",
            json!({"token": mutate(&c_token), "channels": ["a"]}),
        ),
        (
            "/internal/subscribe",
            json!({"token": c_token, "channels": ["has space"]}),
        ),
        (
            "/internal/unsubscribe",
            json!({"token": mutate(&c_token), "channels": ["a"]}),
        ),
        ("/internal/publish", json!({"event": {"data": "x"}})),
        (
            "/internal/publish",
            json!({"channel": "nobody", "channels": ["x"], "event": {"data": "x"}}),
        ),
        (
            "/internal/publish",
            json!({"channel": "nobody", "event": {"data": "x"}}),
        ),
    ];
    for (path, body) in &cases {
        let want = single.post(path, body).await;
        for (i, gw) in cl.nodes.iter().enumerate() {
            let got = gw.post(path, body).await;
            assert_eq!(
                (got.status(), got.json()),
                (want.status(), want.json()),
                "node {i}: POST {path} {body}: the cluster must answer as one gateway"
            );
        }
    }
    // A body that is not JSON at all.
    let want = single.post_raw("/internal/send", b"nope").await;
    for gw in &cl.nodes {
        let got = gw.post_raw("/internal/send", b"nope").await;
        assert_eq!((got.status(), got.json()), (want.status(), want.json()));
    }

    // A token that was open on A and closed is 404 from every node once its disconnect came.
    on_a.reset();
    cl.backend.next_disconnect(&a_token, "client_closed").await;
    for gw in &cl.nodes {
        gw.send(&json!({"token": a_token, "event": {"data": "late"}}))
            .await
            .assert_json(404, not_found());
    }
}

#[tokio::test]
async fn a_publish_via_b_reaches_every_member_on_every_node_once() {
    let mut cl = three().await;
    let mut streams = Vec::new();
    for (node, name, channels) in [
        (A, "a0", &["prices"][..]),
        (A, "a1", &["prices"]),
        (A, "a2", &["prices", "news"]),
        (B, "b0", &["prices"]),
        (C, "c0", &["prices"]),
        (C, "c1", &["prices", "news"]),
        (C, "c2", &["news"]),
        (C, "c3", &["other"]),
    ] {
        let (stream, token) = cl.open_in(node, &format!("/{name}"), channels).await;
        streams.push((name, stream, token));
    }

    let delivered = publish_ok(
        &cl.nodes[B],
        &json!({"channel": "prices", "event": {"name": "tick", "data": seq_data("p", 1), "id": "p1"}}),
    )
    .await;
    assert_eq!(delivered, 6, "a0 a1 a2 b0 c0 c1");
    let delivered = publish_ok(
        &cl.nodes[A],
        &json!({"channels": ["prices", "news"], "event": {"data": seq_data("pn", 2)}}),
    )
    .await;
    assert_eq!(delivered, 7, "every prices or news member, once each");
    let delivered = publish_ok(
        &cl.nodes[C],
        &json!({"channel": "news", "event": {"data": seq_data("n", 3)}}),
    )
    .await;
    assert_eq!(delivered, 3, "a2 c1 c2");
    for gw in &cl.nodes {
        assert_eq!(
            publish_ok(gw, &json!({"channel": "nobody", "event": {"data": "x"}})).await,
            0
        );
    }

    for (name, stream, _) in streams.iter_mut() {
        let (got, _) = drain(stream, QUIET).await;
        let mut want = Vec::new();
        let prices = ["a0", "a1", "a2", "b0", "c0", "c1"].contains(name);
        let news = ["a2", "c1", "c2"].contains(name);
        if prices {
            want.push(seq_data("p", 1));
        }
        if prices || news {
            want.push(seq_data("pn", 2));
        }
        if news {
            want.push(seq_data("n", 3));
        }
        assert_eq!(got, want, "stream {name}");
    }

    // close: true through B ends every news member on A and C, each with its server_closed.
    let delivered = publish_ok(
        &cl.nodes[B],
        &json!({"channel": "news", "event": {"data": "bye"}, "close": true}),
    )
    .await;
    assert_eq!(delivered, 3);
    let mut closed = Vec::new();
    for (name, stream, token) in streams.iter_mut() {
        if ["a2", "c1", "c2"].contains(name) {
            let (end, items) = stream.end(SOON).await;
            assert_eq!(end, End::Clean, "{name}");
            assert!(
                items
                    .iter()
                    .any(|i| matches!(i, Item::Event(e) if e.data == "bye")),
                "{name}: {items:?}"
            );
            closed.push(token.clone());
        }
    }
    let mut disconnects = Vec::new();
    for _ in 0..3 {
        let cb = cl.backend.next().await;
        assert_eq!(
            (cb.action(), cb.reason()),
            ("disconnect", Some("server_closed"))
        );
        disconnects.push(cb.token().to_owned());
    }
    closed.sort();
    disconnects.sort();
    assert_eq!(disconnects, closed);
    cl.backend.expect_none(QUIET).await;
    assert_eq!(
        publish_ok(
            &cl.nodes[A],
            &json!({"channel": "news", "event": {"data": "x"}})
        )
        .await,
        0
    );
}

#[tokio::test]
async fn subscribe_via_a_for_a_stream_on_c_then_unsubscribe_via_b() {
    let mut cl = three().await;
    let (mut on_c, token) = cl.open_in(C, "/c/subscriber", &[]).await;
    let (mut on_a, _) = cl.open_in(A, "/a/member", &["room"]).await;

    cl.nodes[A]
        .post(
            "/internal/subscribe",
            &json!({"token": token, "channels": ["room", "lobby"]}),
        )
        .await
        .assert_json(200, json!({"status": "ok"}));
    // The subscribe was answered: a publish from any node now reaches the stream on C.
    assert_eq!(
        publish_ok(
            &cl.nodes[B],
            &json!({"channel": "room", "event": {"data": seq_data("r", 1)}})
        )
        .await,
        2
    );
    assert_eq!(on_c.next_event(SOON).await.data, seq_data("r", 1));
    assert_eq!(on_a.next_event(SOON).await.data, seq_data("r", 1));
    assert_eq!(
        publish_ok(
            &cl.nodes[A],
            &json!({"channel": "lobby", "event": {"data": seq_data("l", 2)}})
        )
        .await,
        1
    );
    assert_eq!(on_c.next_event(SOON).await.data, seq_data("l", 2));

    cl.nodes[B]
        .post(
            "/internal/unsubscribe",
            &json!({"token": token, "channels": ["room", "lobby"]}),
        )
        .await
        .assert_json(200, json!({"status": "ok"}));
    assert_eq!(
        publish_ok(
            &cl.nodes[A],
            &json!({"channel": "room", "event": {"data": seq_data("r", 3)}})
        )
        .await,
        1
    );
    assert_eq!(
        publish_ok(
            &cl.nodes[C],
            &json!({"channel": "lobby", "event": {"data": seq_data("l", 4)}})
        )
        .await,
        0
    );
    assert_eq!(on_a.next_event(SOON).await.data, seq_data("r", 3));
    expect_no_event(&mut on_c, QUIET).await;
    expect_no_event(&mut on_a, QUIET).await;

    // Leaving a channel not joined, joining twice: not errors, through any node.
    for gw in &cl.nodes {
        gw.post(
            "/internal/unsubscribe",
            &json!({"token": token, "channels": ["never"]}),
        )
        .await
        .assert_json(200, json!({"status": "ok"}));
        gw.post(
            "/internal/subscribe",
            &json!({"token": token, "channels": ["twice"]}),
        )
        .await
        .assert_json(200, json!({"status": "ok"}));
    }
    assert_eq!(
        publish_ok(
            &cl.nodes[B],
            &json!({"channel": "twice", "event": {"data": "once"}})
        )
        .await,
        1
    );
    let (got, _) = drain(&mut on_c, QUIET).await;
    assert_eq!(got, ["once"]);
}

#[tokio::test]
async fn close_via_b_ends_a_stream_on_a_with_its_server_closed_callback() {
    let mut cl = three().await;
    let (mut on_a, token) = cl.open_in(A, "/a/closing", &["room"]).await;

    cl.nodes[B]
        .send(&json!({"token": token, "event": {"data": "last words"}, "close": true}))
        .await
        .assert_json(200, json!({"status": "ok"}));
    let (end, items) = on_a.end(SOON).await;
    assert_eq!(end, End::Clean, "the chunked body's last chunk");
    let events: Vec<String> = items
        .into_iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(e.data),
            Item::Comment(_) => None,
        })
        .collect();
    assert_eq!(events, ["last words"]);
    let cb = cl.backend.next_disconnect(&token, "server_closed").await;
    assert_eq!(cb.url(), "/a/closing");
    cl.backend.expect_none(QUIET).await;

    for gw in &cl.nodes {
        gw.send(&json!({"token": token, "close": true}))
            .await
            .assert_json(404, not_found());
    }
    assert_eq!(
        publish_ok(
            &cl.nodes[C],
            &json!({"channel": "room", "event": {"data": "x"}})
        )
        .await,
        0
    );

    // close alone (no event) through C, for a stream on B.
    let (mut on_b, token) = cl.open_in(B, "/b/closing", &[]).await;
    cl.nodes[C]
        .send(&json!({"token": token, "close": true}))
        .await
        .assert_json(200, json!({"status": "ok"}));
    let (end, items) = on_b.end(SOON).await;
    assert_eq!(end, End::Clean);
    assert!(
        items.iter().all(|i| matches!(i, Item::Comment(_))),
        "{items:?}"
    );
    cl.backend.next_disconnect(&token, "server_closed").await;
}

#[tokio::test]
async fn the_holders_errors_come_back_through_another_node() {
    let limits = |b: common::GatewayBuilder| {
        b.env("MAX_CHANNELS_PER_STREAM", "2")
            .env("MAX_QUEUE_BYTES", "65536")
            .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
    };
    let mut single_backend = Backend::start().await;
    let single = limits(Gateway::builder().callback(&single_backend))
        .spawn()
        .await;
    single_backend.on_connect(Reply::ok().body(json!({"channels": ["one"]}).to_string()));
    let (_s, single_token) = single.open(&mut single_backend, "/single").await;
    let over = json!({"token": single_token, "channels": ["two", "three"]});
    let want = single.post("/internal/subscribe", &over).await;
    assert_eq!(want.status(), 400, "{}", want.text());
    assert!(
        want.text().contains("MAX_CHANNELS_PER_STREAM"),
        "{}",
        want.text()
    );

    let mut cl = Cluster::start(3, limits).await;
    let (mut on_c, token) = cl.open_in(C, "/c/limited", &["one"]).await;
    let got = cl.nodes[A]
        .post(
            "/internal/subscribe",
            &json!({"token": token, "channels": ["two", "three"]}),
        )
        .await;
    assert_eq!((got.status(), got.json()), (want.status(), want.json()));
    // Nothing was changed: the stream is still in "one" only, and one more fits.
    assert_eq!(
        publish_ok(
            &cl.nodes[B],
            &json!({"channels": ["two", "three"], "event": {"data": "x"}})
        )
        .await,
        0
    );
    cl.nodes[B]
        .post(
            "/internal/subscribe",
            &json!({"token": token, "channels": ["two"]}),
        )
        .await
        .assert_json(200, json!({"status": "ok"}));
    let got = cl.nodes[A]
        .post(
            "/internal/subscribe",
            &json!({"token": token, "channels": ["three"]}),
        )
        .await;
    assert_eq!((got.status(), got.json()), (want.status(), want.json()));
    assert_eq!(
        publish_ok(
            &cl.nodes[A],
            &json!({"channels": ["one", "two"], "event": {"data": "in both"}})
        )
        .await,
        1
    );
    assert_eq!(on_c.next_event(SOON).await.data, "in both");

    // A client on C that does not read: sends through A fill its 64 KiB queue, and the one that
    // would overflow it is C's 500, through A; the stream ends with an `error` disconnect.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let _stalled = open_stream_with(cl.nodes[C].addr, "/c/stalled", &[], Some(sock))
        .await
        .unwrap_or_else(|r| panic!("{}", r.status()));
    let stalled = cl.backend.next_connect().await.token().to_owned();
    let data = "y".repeat(16 * 1024);
    let mut sender = Sender::connect(&cl.nodes[A]).await;
    let mut overflowed = None;
    for i in 0..3000 {
        let r: Response = sender
            .post(
                "/internal/send",
                &json!({"token": stalled, "event": {"data": data}}),
            )
            .await;
        match r.status() {
            200 => {}
            500 => {
                r.assert_json(500, json!({"error": "Write failed: connection closed"}));
                overflowed = Some(i);
                break;
            }
            s => panic!("send {i} via A: {s} {}", r.text()),
        }
    }
    let at = overflowed.expect("a stalled client on C must overflow its queue through A");
    assert!(at >= 4, "overflowed after {at} x 16 KiB (queue 64 KiB)");
    cl.backend.next_disconnect(&stalled, "error").await;
    cl.nodes[B]
        .send(&json!({"token": stalled, "event": {"data": "x"}}))
        .await
        .assert_json(404, not_found());
}

#[tokio::test]
async fn a_batch_through_a_reaches_tokens_on_every_node() {
    let mut cl = three().await;
    let (mut on_a, ta) = cl.open_in(A, "/a/batch", &[]).await;
    let (mut on_b, tb) = cl.open_in(B, "/b/batch", &[]).await;
    let (mut on_c, tc) = cl.open_in(C, "/c/batch", &[]).await;
    let ok = json!({"status": 200, "body": {"status": "ok"}});
    let r = cl.nodes[A]
        .post(
            "/internal/batch",
            &json!({"requests": [
                {"op": "send", "token": tc, "event": {"data": "c1"}},
                {"op": "send", "token": tb, "event": {"data": "b1"}},
                {"op": "send", "token": mutate(&tc), "event": {"data": "x"}},
                {"op": "subscribe", "token": tc, "channels": ["batch"]},
                {"op": "subscribe", "token": tb, "channels": ["batch"]},
                {"op": "publish", "channel": "batch", "event": {"data": "p"}},
                {"op": "send", "token": ta, "event": {"data": "a1"}},
                {"op": "send", "token": tc, "event": {"data": "c2"}},
            ]}),
        )
        .await;
    r.assert_json(
        200,
        json!({"results": [
            ok, ok,
            {"status": 404, "body": {"error": "Token not found"}},
            ok, ok,
            {"status": 200, "body": {"status": "ok", "delivered": 2}},
            ok, ok,
        ]}),
    );
    assert_eq!(drain(&mut on_c, QUIET).await.0, ["c1", "p", "c2"]);
    assert_eq!(drain(&mut on_b, QUIET).await.0, ["b1", "p"]);
    assert_eq!(drain(&mut on_a, QUIET).await.0, ["a1"]);
}

#[tokio::test]
async fn metrics_and_readyz_of_a_cluster() {
    let mut cl = three().await;
    for gw in &cl.nodes {
        readyz(gw).await.assert_json(200, ready_body());
        let m = gw.metrics().await;
        assert_eq!(m.get(NODES, &[]), Some(3.0), "{}", m.text);
        assert_eq!(m.get(REDIS_UP, &[]), Some(1.0), "{}", m.text);
        assert!(m.has(FORWARDED) || m.text.contains(FORWARDED), "{}", m.text);
    }
    let (mut on_c, token) = cl.open_in(C, "/c/metrics", &[]).await;

    // A send that stays on its node is not forwarded.
    let before = cl.forwarded("send").await;
    cl.nodes[C]
        .send_ok(&json!({"token": token, "event": {"data": "local"}}))
        .await;
    assert_eq!(on_c.next_event(SOON).await.data, "local");
    assert_eq!(
        cl.forwarded("send").await,
        before,
        "a local send is not forwarded"
    );

    // A send for C's token through A is.
    cl.nodes[A]
        .send_ok(&json!({"token": token, "event": {"data": "remote"}}))
        .await;
    assert_eq!(on_c.next_event(SOON).await.data, "remote");
    wait_sum(&cl, "send", before + 1.0).await;

    let before = cl.forwarded("membership").await;
    cl.nodes[A]
        .post(
            "/internal/subscribe",
            &json!({"token": token, "channels": ["m"]}),
        )
        .await
        .assert_json(200, json!({"status": "ok"}));
    wait_sum(&cl, "membership", before + 1.0).await;

    let before = cl.forwarded("publish").await;
    assert_eq!(
        publish_ok(
            &cl.nodes[B],
            &json!({"channel": "m", "event": {"data": "fan"}})
        )
        .await,
        1
    );
    assert_eq!(on_c.next_event(SOON).await.data, "fan");
    wait_sum(&cl, "publish", before + 1.0).await;
}

/// Waits until the forwarded counter of `kind`, summed over the nodes, reaches `at_least`.
async fn wait_sum(cl: &Cluster, kind: &str, at_least: f64) {
    let deadline = Instant::now() + SOON;
    loop {
        let sum = cl.forwarded(kind).await;
        if sum >= at_least {
            return;
        }
        if Instant::now() > deadline {
            let mut scrapes = String::new();
            for gw in &cl.nodes {
                let m = gw.metrics().await;
                for s in m.samples.iter().filter(|s| s.name == FORWARDED) {
                    scrapes.push_str(&format!("{} {:?} {}\n", gw.addr, s.labels, s.value));
                }
            }
            panic!("{FORWARDED}{{kind={kind:?}}} summed over the nodes is {sum}, want >= {at_least}:\n{scrapes}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn without_redis_url_a_single_node_has_no_cluster_metrics() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    readyz(&gw)
        .await
        .assert_json(200, json!({"status": "ready", "configured": true}));
    let (mut stream, token) = gw.open(&mut backend, "/single").await;
    gw.send_ok(&json!({"token": token, "event": {"data": "x"}}))
        .await;
    assert_eq!(stream.next_event(SOON).await.data, "x");
    let m = gw.metrics().await;
    for name in [NODES, REDIS_UP, FORWARDED] {
        assert!(
            !m.text.contains(name),
            "{name} without REDIS_URL:\n{}",
            m.text
        );
    }
    assert_eq!(
        publish(&gw, &json!({"channel": "c", "event": {"data": "x"}}))
            .await
            .json(),
        json!({"status": "ok", "delivered": 0})
    );
}

/// The Redis channels whose name contains `part`, with their subscriber counts (one per node
/// that listens).
async fn listeners(redis: &Redis, part: &str) -> Vec<(String, i64)> {
    let pattern = format!("*{part}*");
    let Resp::Array(Some(names)) = redis.query(&["PUBSUB", "CHANNELS", &pattern]).await else {
        panic!("PUBSUB CHANNELS answered no array");
    };
    let mut out = Vec::new();
    for name in names {
        let Resp::Bulk(Some(name)) = name else {
            panic!("a channel name: {name:?}")
        };
        let reply = redis.query(&["PUBSUB", "NUMSUB", &name]).await;
        let Resp::Array(Some(pair)) = &reply else {
            panic!("NUMSUB: {reply:?}")
        };
        let Resp::Int(n) = pair[1] else {
            panic!("NUMSUB: {reply:?}")
        };
        if n > 0 {
            out.push((name, n));
        }
    }
    out
}

/// Polls [`listeners`] until the channel carrying `part` has `n` subscribers (0: no channel).
async fn wait_listeners(redis: &Redis, part: &str, n: i64) {
    let deadline = Instant::now() + SOON;
    loop {
        let now = listeners(redis, part).await;
        let count = match now.as_slice() {
            [] => 0,
            [(_, count)] => *count,
            more => panic!("one Redis channel per gateway channel, got {more:?}"),
        };
        if count == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the channel {part} has {now:?} listening nodes in Redis, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// §10: traffic follows interest. A node listens to a channel's publishes (one Redis
/// subscription per node, not per stream) only while it holds a member of the channel.
#[tokio::test]
async fn a_node_listens_to_a_channel_only_while_it_holds_a_member() {
    let mut cl = three().await;
    assert_eq!(listeners(&cl.redis, "probe-room").await, []);
    let (mut on_c, _) = cl.open_in(C, "/c/probe", &["probe-room"]).await;
    wait_listeners(&cl.redis, "probe-room", 1).await;
    let (on_a1, ta1) = cl.open_in(A, "/a/probe1", &["probe-room"]).await;
    let (_on_a2, ta2) = cl.open_in(A, "/a/probe2", &[]).await;
    cl.nodes[B]
        .post(
            "/internal/subscribe",
            &json!({"token": ta2, "channels": ["probe-room"]}),
        )
        .await
        .assert_json(200, json!({"status": "ok"}));
    wait_listeners(&cl.redis, "probe-room", 2).await;
    assert_eq!(
        publish_ok(
            &cl.nodes[B],
            &json!({"channel": "probe-room", "event": {"data": "x"}})
        )
        .await,
        3
    );
    assert_eq!(on_c.next_event(SOON).await.data, "x");
    // §10.1: every key and channel the gateways use starts with `sse-gateway:`.
    for query in [&["KEYS", "*"][..], &["PUBSUB", "CHANNELS", "*"]] {
        let Resp::Array(Some(names)) = cl.redis.query(query).await else {
            panic!("{query:?}: no array")
        };
        assert!(!names.is_empty(), "{query:?}: nothing in Redis");
        for name in names {
            let Resp::Bulk(Some(name)) = name else {
                panic!("{query:?}: {name:?}")
            };
            assert!(name.starts_with("sse-gateway:"), "{query:?}: {name}");
        }
    }

    // One of A's members leaves: A still listens. The other leaves too: A stops.
    on_a1.reset();
    cl.backend.next_disconnect(&ta1, "client_closed").await;
    wait_listeners(&cl.redis, "probe-room", 2).await;
    cl.nodes[C]
        .post(
            "/internal/unsubscribe",
            &json!({"token": ta2, "channels": ["probe-room"]}),
        )
        .await
        .assert_json(200, json!({"status": "ok"}));
    wait_listeners(&cl.redis, "probe-room", 1).await;
    assert_eq!(
        publish_ok(
            &cl.nodes[A],
            &json!({"channel": "probe-room", "event": {"data": "y"}})
        )
        .await,
        1
    );
    assert_eq!(on_c.next_event(SOON).await.data, "y");
    on_c.reset();
    wait_listeners(&cl.redis, "probe-room", 0).await;
    assert_eq!(
        publish_ok(
            &cl.nodes[A],
            &json!({"channel": "probe-room", "event": {"data": "z"}})
        )
        .await,
        0
    );
}

/// §10.1: "point several deployments at different Redis databases (`redis://host:port/<db>`) to
/// keep them apart". Two deployments of two nodes each on one Redis, databases 1 and 2, with a
/// channel name in common: neither sees the other's nodes, streams, publishes or tokens.
#[tokio::test]
async fn two_deployments_on_one_redis_in_different_databases_stay_apart() {
    let redis = Redis::start().await;
    let mut backends = [Backend::start().await, Backend::start().await];
    let mut deployments: Vec<Vec<Gateway>> = Vec::new();
    for (d, db) in [(0, 1), (1, 2)] {
        let mut nodes = Vec::new();
        for _ in 0..2 {
            nodes.push(
                Gateway::builder()
                    .callback(&backends[d])
                    .env("REDIS_URL", format!("{}/{db}", redis.url()))
                    .spawn()
                    .await,
            );
        }
        deployments.push(nodes);
    }
    for nodes in &deployments {
        wait_joined(nodes, 2, SOON).await;
    }
    let mut streams = Vec::new();
    for (d, backend) in backends.iter_mut().enumerate() {
        backend.on_connect(Reply::ok().body(json!({"channels": ["shared"]}).to_string()));
        streams.push(deployments[d][0].open(backend, "/shared").await);
    }

    for d in [0, 1] {
        let other = 1 - d;
        let via = &deployments[d][1];
        assert_eq!(
            publish_ok(
                via,
                &json!({"channel": "shared", "event": {"data": format!("to {d}")}})
            )
            .await,
            1,
            "a publish in deployment {d} counts only its own stream"
        );
        via.send_ok(&json!({"token": streams[d].1, "event": {"data": format!("send {d}")}}))
            .await;
        via.send(&json!({"token": streams[other].1, "event": {"data": "foreign"}}))
            .await
            .assert_json(404, not_found());
        let (got, _) = drain(&mut streams[d].0, QUIET).await;
        assert_eq!(
            got,
            [format!("to {d}"), format!("send {d}")],
            "deployment {d}"
        );
    }
    for d in [0, 1] {
        expect_no_event(&mut streams[d].0, QUIET).await;
    }
    for nodes in &deployments {
        for gw in nodes {
            assert_eq!(gw.metrics().await.get(NODES, &[]), Some(2.0));
        }
    }
}

/// §10: `REDIS_URL` may carry `user:password@`. Nodes with the right password (with and without
/// a user name) form a cluster; a node with a wrong one is not ready and stays out; no password
/// ever reaches a log line.
#[tokio::test]
async fn a_redis_with_a_password() {
    const PASSWORD: &str = "s3cret-pw-for-the-test";
    const WRONG: &str = "wrong-pw-for-the-test";
    let redis = Redis::start_with(&["--requirepass", PASSWORD]).await;
    let mut backend = Backend::start().await;
    let host = redis.addr;
    let mut nodes = Vec::new();
    for url in [
        format!("redis://:{PASSWORD}@{host}"),
        format!("redis://default:{PASSWORD}@{host}/0"),
    ] {
        nodes.push(
            Gateway::builder()
                .callback(&backend)
                .env("REDIS_URL", url)
                .spawn()
                .await,
        );
    }
    let outsider = Gateway::builder()
        .callback(&backend)
        .env("REDIS_URL", format!("redis://:{WRONG}@{host}"))
        .spawn()
        .await;
    wait_joined(&nodes, 2, SOON).await;
    let (mut on_1, t1) = nodes[1].open(&mut backend, "/pw").await;
    nodes[0]
        .send_ok(&json!({"token": t1, "event": {"data": "through an authenticated Redis"}}))
        .await;
    assert_eq!(
        on_1.next_event(SOON).await.data,
        "through an authenticated Redis"
    );

    readyz(&outsider).await.assert_json(
        503,
        json!({"status": "not_ready", "configured": true, "redis": false}),
    );
    assert_eq!(outsider.metrics().await.get(REDIS_UP, &[]), Some(0.0));
    outsider
        .send(&json!({"token": t1, "event": {"data": "x"}}))
        .await
        .assert_json(503, json!({"error": "Cluster unavailable"}));
    for gw in &nodes {
        assert_eq!(gw.metrics().await.get(NODES, &[]), Some(2.0));
    }
    for gw in nodes.iter().chain([&outsider]) {
        for line in gw.logs.lines() {
            assert!(
                !line.contains(PASSWORD) && !line.contains(WRONG),
                "a log line holds the Redis password: {line}"
            );
        }
    }
}
