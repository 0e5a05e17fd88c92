//! PROTOCOL §11 and §11.1 in a cluster: the history lives in Redis, so a page resumes on any node.
//! Real gateway processes joined by a real `redis-server` (one per test, on a free loopback port),
//! the backend double answering channel lists, and the independent SSE parser: an event's
//! `last_event_id` is what a browser's `EventSource` would send back as `Last-Event-ID`.
//!
//! What is checked: a page resumes on another node after its first node was killed; one position
//! order across nodes while a reader hops between nodes under load from two publishing nodes;
//! `HISTORY_SIZE` and the TTL enforced in Redis (a gap, then an exact resume from the gap's id); a
//! Redis restarted empty starts a new epoch (an old position is a gap, never a wrong resume); a
//! resume while Redis is unreachable ends the new stream cleanly and resumes exactly once Redis is
//! back; `event.id` refused in a publish; the keys under `sse-gateway:<db>:history:` with a TTL; a
//! burst of publishes through one node reaching another node's members complete and in order, also
//! when a node answers them too late (frozen past `CLUSTER_TIMEOUT_MS`); a new stream's start
//! position (the `id:`-only block) resumes on another node; a publish counted as delivered to a
//! stream that is being opened reaches it; a channel named `clock` is a channel like any other.
//!
//! Positions read `<epoch>-<seq>-<ms>` (§11.1); the tests parse them to check order and
//! completeness: every publish of a test goes to channels a checked stream is in, so the seqs a
//! stream sees must be contiguous.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::cluster::{
    drain, expect_no_event, parse_seq, publish, publish_ok, seq_data, wait_ready, wait_readyz,
    Cluster, Sender,
};
use common::http::open_stream_with;
use common::redis::Resp;
use common::{last_event_id_header, next_events, SseStream, SOON};
use common::{Backend, End, Event, Gateway, GatewayBuilder, HttpConn, Item, NoItem, Redis, Reply};
use serde_json::{json, Value};
use tokio::time::Instant;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// A window in which an event that should not come would have come.
const QUIET: Duration = Duration::from_millis(400);
/// §10: a node rejoins within 2 s of Redis being back; slack for the test's own polling.
const REJOIN: Duration = Duration::from_millis(2500);
const GAP: &str = "gateway.gap";
const RESUMES: &str = "sse_gateway_resumes_total";

fn with_history(size: &'static str) -> impl Fn(GatewayBuilder) -> GatewayBuilder {
    move |b| b.env("HISTORY_SIZE", size)
}

/// The Redis key `sse-gateway:0:<rest>` (the clusters here use database 0 unless said).
fn key(rest: &str) -> String {
    format!("sse-gateway:0:{rest}")
}

/// A position as §11.1 writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    epoch: String,
    seq: u64,
    ms: u64,
}

/// Parses `<epoch>-<seq>-<ms>` and checks that `ms` is a publish time of this run (the test and
/// Redis share the host's clock).
#[track_caller]
fn position(id: &str) -> Position {
    let parts: Vec<&str> = id.split('-').collect();
    let parsed = match parts[..] {
        [epoch, seq, ms] if !epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_hexdigit()) => {
            seq.parse()
                .ok()
                .zip(ms.parse().ok())
                .map(|(seq, ms)| Position {
                    epoch: epoch.to_owned(),
                    seq,
                    ms,
                })
        }
        _ => None,
    };
    let p = parsed.unwrap_or_else(|| panic!("id {id:?} is not <epoch>-<seq>-<ms>"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        p.ms <= now + 1000 && p.ms + 120_000 >= now,
        "the ms of {id:?} is not a publish time of this run (now {now})"
    );
    p
}

/// Asserts that `events` carry positions of one epoch with strictly increasing seqs, all after
/// `after` (when given).
#[track_caller]
fn assert_in_order(events: &[Event], after: Option<&str>) {
    let mut previous = after.map(position);
    for e in events {
        let p = position(&e.last_event_id);
        if let Some(prev) = &previous {
            assert_eq!(p.epoch, prev.epoch, "one epoch: {e:?} after {prev:?}");
            assert!(
                p.seq > prev.seq,
                "positions strictly increase: {e:?} after {prev:?}"
            );
        }
        previous = Some(p);
    }
}

fn datas(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.data.as_str()).collect()
}

fn ids(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.last_event_id.as_str()).collect()
}

/// `{"channel": ...}` or `{"channels": [...]}` with an event of `data`.
fn event_to(target: &Value, data: &str) -> Value {
    let mut body = target.clone();
    body["event"] = json!({ "data": data });
    body
}

/// Opens a stream on `gw` that the backend puts in `channels`, coming back with `last` (if any) in
/// the `Last-Event-ID` header. Returns it with its token: the connect callback is in the
/// backend's queue once the 200 arrived; disconnects of streams closed earlier are skipped.
async fn open_at(
    backend: &mut Backend,
    gw: &Gateway,
    channels: &[&str],
    last: Option<&str>,
) -> (SseStream, String) {
    let headers = last_event_id_header(last);
    open_target(backend, gw, "/history", &headers, channels).await
}

/// [`open_at`] for `GET target` with `headers`.
async fn open_target(
    backend: &mut Backend,
    gw: &Gateway,
    target: &str,
    headers: &[(&str, &[u8])],
    channels: &[&str],
) -> (SseStream, String) {
    backend.on_connect(Reply::ok().body(json!({ "channels": channels }).to_string()));
    let stream = open_stream_with(gw.addr, target, headers, None)
        .await
        .unwrap_or_else(|r| {
            panic!(
                "GET {target} on {} refused: {} {}",
                gw.addr,
                r.status(),
                r.text()
            )
        });
    loop {
        let cb = backend.next().await;
        match cb.action() {
            "connect" => return (stream, cb.token().to_owned()),
            "disconnect" => continue,
            other => panic!("unexpected callback {other}: {:?}", cb.body),
        }
    }
}

/// The page goes away: its connection closes and the backend hears `client_closed`, so nothing
/// published after this can be counted as delivered to it.
async fn leave(backend: &mut Backend, stream: SseStream, token: &str) {
    drop(stream);
    backend.next_disconnect(token, "client_closed").await;
}

/// Asserts the gap event of §11: `gateway.gap`, data `{"last_event_id": <as sent>}`, and an id
/// that is a position; returns that position.
#[track_caller]
fn assert_gap(e: &Event, sent: &str) -> Position {
    assert_eq!(e.event, GAP, "expected the gap event first, got {e:?}");
    let data: Value = serde_json::from_str(&e.data)
        .unwrap_or_else(|err| panic!("gap data is JSON: {err}: {:?}", e.data));
    assert_eq!(data, json!({ "last_event_id": sent }), "{e:?}");
    position(&e.last_event_id)
}

/// Polls `PUBSUB NUMSUB` until no node listens to any of `channels` (a killed node's
/// subscriptions end when Redis sees its connection close).
async fn until_unwatched(redis: &Redis, channels: &[&str]) {
    let deadline = Instant::now() + SOON;
    loop {
        let mut args = vec!["PUBSUB".to_owned(), "NUMSUB".to_owned()];
        args.extend(channels.iter().map(|c| key(&format!("channel:{c}"))));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = redis.query(&args).await;
        let Resp::Array(Some(items)) = &reply else {
            panic!("PUBSUB NUMSUB answered {reply:?}");
        };
        if items.iter().skip(1).step_by(2).all(|n| *n == Resp::Int(0)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{channels:?} still have subscribers: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The position in the `id:`-only block that a stream in channels opened without a position
/// starts with (§11.1): it dispatches no event, so it is read from the stream's bytes.
async fn start_position(stream: &mut SseStream) -> String {
    let deadline = Instant::now() + SOON;
    loop {
        let text = String::from_utf8_lossy(&stream.payload).into_owned();
        if let Some((block, _)) = text.split_once("\n\n") {
            let id = block
                .strip_prefix("id: ")
                .filter(|id| !id.contains('\n'))
                .unwrap_or_else(|| panic!("the stream starts with an id-only block: {text:?}"));
            position(id);
            return id.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no start position within {SOON:?}: {text:?}"
        );
        match stream.next_item(Duration::from_millis(50)).await {
            Err(NoItem::Timeout) => {}
            other => panic!("before the start position: {other:?}; payload {text:?}"),
        }
    }
}

/// `result` of `sse_gateway_resumes_total` on `gw`.
async fn resumes(gw: &Gateway, result: &str) -> f64 {
    gw.metrics().await.value(RESUMES, &[("result", result)])
}

/// A page in `channel` on node A that got `data`, published through B to it alone, and then left
/// (its disconnect heard): returns that event, whose id is the page's position.
async fn seen_then_left(cl: &mut Cluster, channel: &str, data: &str) -> Event {
    let (mut s, token) = open_at(&mut cl.backend, &cl.nodes[A], &[channel], None).await;
    let to = json!({ "channel": channel });
    assert_eq!(publish_ok(&cl.nodes[B], &event_to(&to, data)).await, 1);
    let event = s.next_event(SOON).await;
    leave(&mut cl.backend, s, &token).await;
    event
}

/// A stream in `channels` on `gw` coming back from `last`, which must get exactly the events with
/// data `want` replayed, in position order after `last`, and then nothing within [`QUIET`];
/// returns it.
async fn resume_exactly(
    backend: &mut Backend,
    gw: &Gateway,
    channels: &[&str],
    last: &str,
    want: &[&str],
) -> SseStream {
    let (mut s, _) = open_at(backend, gw, channels, Some(last)).await;
    let replay = next_events(&mut s, want.len()).await;
    assert_eq!(datas(&replay), want);
    assert_in_order(&replay, Some(last));
    expect_no_event(&mut s, QUIET).await;
    s
}

/// A stream in `channels` on `gw` coming back from `last` while its position cannot be looked up
/// (Redis away): it must end cleanly within `within` with nothing before the end, and the backend
/// hear `server_closed`, so that the browser retries by itself. Returns how long the stream took
/// from its request to its end.
async fn resume_ends_cleanly(
    backend: &mut Backend,
    gw: &Gateway,
    channels: &[&str],
    last: &str,
    within: Duration,
) -> Duration {
    let opened = Instant::now();
    let (mut s, token) = open_at(backend, gw, channels, Some(last)).await;
    let (end, items) = s.end(within).await;
    let took = opened.elapsed();
    assert_eq!(end, End::Clean, "a clean end, so the browser retries");
    assert!(items.is_empty(), "nothing before the end: {items:?}");
    backend.next_disconnect(&token, "server_closed").await;
    took
}

#[tokio::test]
async fn a_page_resumes_on_another_node_after_its_first_node_was_killed() {
    let mut cl = Cluster::start(3, with_history("100")).await;
    // "quiet" never gets an event: a channel that keeps nothing is no gap for a recent position.
    let channels = ["news", "sport", "quiet"];
    // A page whose stream is lost before its first event: it still has the start position.
    let (mut early, _) = open_at(&mut cl.backend, &cl.nodes[A], &channels, None).await;
    let early_id = start_position(&mut early).await;
    let (mut on_a, _) = open_at(&mut cl.backend, &cl.nodes[A], &channels, None).await;
    for (i, ch) in ["news", "sport", "news"].iter().enumerate() {
        let body = event_to(&json!({ "channel": ch }), &format!("seen {i}"));
        assert_eq!(publish_ok(&cl.nodes[C], &body).await, 2);
    }
    let seen = next_events(&mut on_a, 3).await;
    assert_eq!(datas(&seen), ["seen 0", "seen 1", "seen 2"]);
    assert_in_order(&seen, None);
    let last = seen[2].last_event_id.clone();

    // A dies with the page's connection; it sends no disconnect (§10.1) and holds nothing.
    cl.nodes[A].signal(libc::SIGKILL);
    cl.nodes[A].wait_exit(SOON).await;
    drop((on_a, early));
    until_unwatched(&cl.redis, &channels).await;

    // Published while the page is away, through B: nobody is in these channels now.
    let missed = [
        (json!({"channel": "news"}), "missed 0"),
        (json!({"channel": "sport"}), "missed 1"),
        (json!({"channels": ["news", "sport"]}), "missed 2"),
        (json!({"channel": "elsewhere"}), "not the page's"),
        (json!({"channel": "sport"}), "missed 3"),
    ];
    for (target, data) in &missed {
        assert_eq!(publish_ok(&cl.nodes[B], &event_to(target, data)).await, 0);
    }

    // The page reconnects through the load balancer: to B, and (a second tab) to C.
    let (mut on_b, _) = open_at(&mut cl.backend, &cl.nodes[B], &channels, Some(&last)).await;
    let (mut on_c, _) = open_at(&mut cl.backend, &cl.nodes[C], &channels, Some(&last)).await;
    // A page that reopens by itself names its position in the query (§11).
    let by_query = format!("/history?page=1&last_event_id={last}");
    let (mut on_q, _) = open_target(&mut cl.backend, &cl.nodes[C], &by_query, &[], &channels).await;
    let via_b = next_events(&mut on_b, 4).await;
    let via_c = next_events(&mut on_c, 4).await;
    let via_q = next_events(&mut on_q, 4).await;
    let want = ["missed 0", "missed 1", "missed 2", "missed 3"];
    assert_eq!(datas(&via_b), want, "exactly the missed events, in order");
    assert_eq!(datas(&via_c), want);
    assert_eq!(datas(&via_q), want);
    assert_in_order(&via_b, Some(&last));
    assert_eq!(ids(&via_b), ids(&via_c), "the very positions, on any node");
    assert_eq!(ids(&via_b), ids(&via_q));
    assert!(via_b.iter().all(|e| e.event == "message"), "{via_b:?}");
    // "not the page's" took a position between missed 2 and missed 3 but is not replayed.
    assert_eq!(
        position(&via_b[3].last_event_id).seq,
        position(&via_b[2].last_event_id).seq + 2
    );
    // The early page, from its start position: everything published since it joined.
    let (mut on_e, _) = open_at(&mut cl.backend, &cl.nodes[B], &channels, Some(&early_id)).await;
    let via_e = next_events(&mut on_e, 7).await;
    let all: Vec<&str> = ["seen 0", "seen 1", "seen 2"]
        .into_iter()
        .chain(want)
        .collect();
    assert_eq!(datas(&via_e), all);
    assert_eq!(ids(&via_e[..3]), ids(&seen));
    assert_eq!(ids(&via_e[3..]), ids(&via_b));
    tokio::join!(
        expect_no_event(&mut on_b, QUIET),
        expect_no_event(&mut on_c, QUIET),
        expect_no_event(&mut on_q, QUIET),
        expect_no_event(&mut on_e, QUIET)
    );

    // Then live, after the replay.
    let live = event_to(&json!({"channel": "sport"}), "live");
    assert_eq!(publish_ok(&cl.nodes[B], &live).await, 4);
    let (lb, lc) = (on_b.next_event(SOON).await, on_c.next_event(SOON).await);
    assert_eq!((lb.data.as_str(), lc.data.as_str()), ("live", "live"));
    assert_eq!(lb.last_event_id, lc.last_event_id);
    assert_eq!(on_q.next_event(SOON).await, lc);
    assert_eq!(on_e.next_event(SOON).await, lc);
    assert_in_order(&[via_b[3].clone(), lb], None);
    for (i, n) in [(B, 2.0), (C, 2.0)] {
        assert_eq!(resumes(&cl.nodes[i], "complete").await, n, "node {i}");
        assert_eq!(resumes(&cl.nodes[i], "gap").await, 0.0, "node {i}");
    }
}

/// Publishes `<label>#<i>` for i in 0..n through `gw`, ~700 a second, one after the other on one
/// keep-alive connection, to x, y, z and to x and z at once in turn. Each publish is 200.
async fn publish_paced(gw: &Gateway, label: &str, n: u64) {
    let mut sender = Sender::connect(gw).await;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = 0;
    while i < n {
        tick.tick().await;
        for _ in 0..7 {
            if i == n {
                break;
            }
            let target = match i % 4 {
                0 => json!({"channel": "x"}),
                1 => json!({"channel": "y"}),
                2 => json!({"channel": "z"}),
                _ => json!({"channels": ["x", "z"]}),
            };
            let body = event_to(&target, &seq_data(label, i));
            let r = sender.post("/internal/publish", &body).await;
            assert_eq!(r.status(), 200, "publish {body}: {}", r.text());
            // The two anchors, and the reader's streams: the new one, and the one it just left
            // until its node notices the closed connection. An incomplete answer (a node slower
            // than CLUSTER_TIMEOUT_MS) counts what it has.
            let answer = r.json();
            let delivered = answer["delivered"].as_u64().unwrap_or(u64::MAX);
            let complete = answer.get("complete").is_none();
            assert!(
                delivered <= 6 && (!complete || delivered >= 2),
                "{body}: {answer}"
            );
            i += 1;
        }
    }
}

/// Reads `stream` and, every 150-300 events while the publishers run, drops it and reconnects to
/// the next node with the last id seen, as a browser would. Stops once the publishers are done
/// and the stream has been quiet for [`QUIET`]. Returns every event and the number of hops.
async fn read_hopping(
    backend: &mut Backend,
    nodes: &[Gateway],
    channels: &[&str],
    mut stream: SseStream,
    mut node: usize,
    done: &AtomicBool,
) -> (Vec<Event>, usize) {
    let mut got: Vec<Event> = Vec::new();
    let mut hops = 0;
    let mut since_open = 0;
    loop {
        match stream.next_item(QUIET).await {
            Ok(Item::Event(e)) => {
                assert_ne!(
                    e.event,
                    GAP,
                    "no gap while the history holds everything: {e:?} after {} events, hop {hops}",
                    got.len()
                );
                got.push(e);
                since_open += 1;
                if since_open >= 150 + 50 * (hops % 4) && !done.load(Ordering::SeqCst) {
                    let last = got.last().unwrap().last_event_id.clone();
                    drop(stream);
                    hops += 1;
                    node = (node + 1) % nodes.len();
                    stream = open_at(backend, &nodes[node], channels, Some(&last))
                        .await
                        .0;
                    since_open = 0;
                }
            }
            Ok(Item::Comment(_)) => {}
            Err(NoItem::Timeout) if done.load(Ordering::SeqCst) => return (got, hops),
            Err(NoItem::Timeout) => {}
            Err(NoItem::Ended(end)) => panic!(
                "the reader's stream on node {node} ended ({end:?}) after {} events",
                got.len()
            ),
        }
    }
}

#[tokio::test]
async fn one_order_across_nodes_a_reader_hopping_between_nodes_misses_nothing() {
    const PER: u64 = 1500;
    let mut cl = Cluster::start(3, with_history("10000")).await;
    let channels = ["x", "y", "z"];
    let nodes = &cl.nodes;
    let backend = &mut cl.backend;
    // An anchor in every channel on A and on C: the reader's resumes there meet channels the node
    // already listens to, with fan-outs running while it joins and reads the history; on B they
    // subscribe first, and leaving B unsubscribes.
    let mut anchors = Vec::new();
    for i in [A, C] {
        anchors.push((i, open_at(backend, &nodes[i], &channels, None).await.0));
    }
    let (first, _) = open_at(backend, &nodes[B], &channels, None).await;
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let publishers = async {
        tokio::join!(
            publish_paced(&nodes[A], "a", PER),
            publish_paced(&nodes[C], "c", PER)
        );
        done.store(true, Ordering::SeqCst);
    };
    let reader = read_hopping(backend, nodes, &channels, first, B, &done);
    let ((), (got, hops)) = tokio::join!(publishers, reader);
    let all = got.clone();
    eprintln!(
        "{} events through A and C, read in {} connections over {:?}",
        got.len(),
        hops + 1,
        start.elapsed()
    );
    assert!(hops >= 6, "the reader reconnected only {hops} times");
    for label in ["a", "c"] {
        let seqs: Vec<u64> = got
            .iter()
            .filter_map(|e| parse_seq(&e.data).filter(|(l, _)| *l == label))
            .map(|(_, s)| s)
            .collect();
        if seqs != (0..PER).collect::<Vec<_>>() {
            let missing: Vec<u64> = (0..PER).filter(|s| !seqs.contains(s)).collect();
            panic!(
                "publisher {label}: {} events received, missing {missing:?}, order/duplicates: {:?}",
                seqs.len(),
                seqs.windows(2).filter(|w| w[1] != w[0] + 1).collect::<Vec<_>>()
            );
        }
    }
    assert_eq!(got.len() as u64, 2 * PER, "nothing else arrived");
    assert_in_order(&got, None);
    // Every publish of the deployment went to the reader's channels: no position is missing.
    let first = position(&got[0].last_event_id).seq;
    let last = position(&got[got.len() - 1].last_event_id).seq;
    assert_eq!((first, last), (1, 2 * PER), "contiguous positions");
    for (i, anchor) in &mut anchors {
        let (got, _) = drain_events(anchor, QUIET).await;
        assert_eq!(got.len() as u64, 2 * PER, "anchor on node {i}");
        assert_in_order(&got, None);
        assert_eq!(
            ids(&got),
            ids(&all),
            "anchor on node {i}: the reader's very positions"
        );
    }
}

/// Reads a stream until it has been quiet (no event) for `quiet`; the events in arrival order.
async fn drain_events(stream: &mut SseStream, quiet: Duration) -> (Vec<Event>, usize) {
    let mut events = Vec::new();
    let mut comments = 0;
    loop {
        match stream.next_item(quiet).await {
            Ok(Item::Event(e)) => events.push(e),
            Ok(Item::Comment(_)) => comments += 1,
            Err(NoItem::Timeout) => return (events, comments),
            Err(NoItem::Ended(end)) => {
                panic!("stream ended ({end:?}) after {} events", events.len())
            }
        }
    }
}

#[tokio::test]
async fn history_size_trims_in_redis_an_older_position_is_a_gap_and_the_gaps_id_resumes_exactly() {
    let mut cl = Cluster::start(2, with_history("3")).await;
    let ch = ["t"];
    let to_t = json!({"channel": "t"});
    let e0 = seen_then_left(&mut cl, "t", "e0").await;
    assert_eq!(e0.data, "e0");
    let p0 = e0.last_event_id.clone();

    // Five while away: Redis keeps the last three; e1 and e2 are dropped.
    for i in 1..=5 {
        let data = format!("e{i}");
        assert_eq!(publish_ok(&cl.nodes[B], &event_to(&to_t, &data)).await, 0);
    }
    assert_eq!(cl.redis.command(&["LLEN", &key("history:t")]).await, ":3");

    let (mut s, token) = open_at(&mut cl.backend, &cl.nodes[B], &ch, Some(&p0)).await;
    let gap = s.next_event(SOON).await;
    let g = assert_gap(&gap, &p0);
    let from = position(&p0);
    assert_eq!(g.epoch, from.epoch);
    assert_eq!(g.seq, from.seq + 5, "the gap's id is the current position");
    expect_no_event(&mut s, QUIET).await;
    assert_eq!(publish_ok(&cl.nodes[A], &event_to(&to_t, "live")).await, 1);
    let live = s.next_event(SOON).await;
    assert_eq!(live.data, "live", "live events follow the gap");
    assert_in_order(&[gap.clone(), live], None);
    assert_eq!(resumes(&cl.nodes[B], "gap").await, 1.0);
    leave(&mut cl.backend, s, &token).await;

    // A position of this epoch but ahead of the history is a gap too (§11.1).
    let ahead = format!("{}-{}-{}", g.epoch, g.seq + 1000, g.ms);
    let (mut s, token) = open_at(&mut cl.backend, &cl.nodes[A], &ch, Some(&ahead)).await;
    let g2 = assert_gap(&s.next_event(SOON).await, &ahead);
    assert_eq!(g2.seq, g.seq + 1, "the current position");
    expect_no_event(&mut s, QUIET).await;
    leave(&mut cl.backend, s, &token).await;

    // Back with the gap's id (the page reloaded its state; the live event came after it): Redis
    // now holds live, m1, m2, and dropped exactly the gap's position, which is no gap.
    for data in ["m1", "m2"] {
        assert_eq!(publish_ok(&cl.nodes[B], &event_to(&to_t, data)).await, 0);
    }
    let (from, want) = (&gap.last_event_id, ["live", "m1", "m2"]);
    let _s = resume_exactly(&mut cl.backend, &cl.nodes[A], &ch, from, &want).await;
    assert_eq!(resumes(&cl.nodes[A], "complete").await, 1.0);
    assert_eq!(resumes(&cl.nodes[A], "gap").await, 1.0);
}

#[tokio::test]
async fn events_expired_by_the_ttl_in_redis_are_a_gap() {
    let mut cl = Cluster::start(2, |b| {
        b.env("HISTORY_SIZE", "10").env("HISTORY_TTL_SECONDS", "1")
    })
    .await;
    let ch = ["ttl"];
    let to_ttl = json!({"channel": "ttl"});
    let p0 = seen_then_left(&mut cl, "ttl", "e0").await.last_event_id;
    assert_eq!(
        publish_ok(&cl.nodes[B], &event_to(&to_ttl, "missed")).await,
        0
    );
    let pttl: i64 = cl
        .redis
        .command(&["PTTL", &key("history:ttl")])
        .await
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&pttl), "PTTL {pttl}");

    // Redis forgets the channel by itself, one TTL after its last publish.
    let deadline = Instant::now() + SOON;
    while cl.redis.command(&["EXISTS", &key("history:ttl")]).await != ":0" {
        assert!(
            Instant::now() < deadline,
            "history:ttl did not expire within {SOON:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        cl.redis
            .command(&["EXISTS", &key("history-floor:ttl")])
            .await,
        ":0"
    );

    // "missed" expired: missing it is a gap, on either node.
    for i in [B, A] {
        let (mut s, token) = open_at(&mut cl.backend, &cl.nodes[i], &ch, Some(&p0)).await;
        let gap = s.next_event(SOON).await;
        let g = assert_gap(&gap, &p0);
        assert_eq!(g.seq, position(&p0).seq + 1, "the current position");
        expect_no_event(&mut s, QUIET).await;
        leave(&mut cl.backend, s, &token).await;
        assert_eq!(resumes(&cl.nodes[i], "gap").await, 1.0);
    }
}

#[tokio::test]
async fn a_redis_restarted_empty_starts_a_new_epoch_an_old_position_is_a_gap() {
    let mut cl = Cluster::start(3, with_history("100")).await;
    let ch = ["r"];
    let to_r = json!({"channel": "r"});
    let (mut s, token) = open_at(&mut cl.backend, &cl.nodes[A], &ch, None).await;
    for i in 0..3 {
        let data = format!("old {i}");
        assert_eq!(publish_ok(&cl.nodes[B], &event_to(&to_r, &data)).await, 1);
    }
    let old = next_events(&mut s, 3).await;
    let p_old = old[2].last_event_id.clone();
    leave(&mut cl.backend, s, &token).await;

    // Redis dies; nothing of it survives on disk.
    cl.redis.kill().await;
    let files = cl.redis.persisted_files();
    assert!(
        files.is_empty(),
        "an RDB or AOF in {}: {files:?}",
        cl.redis.dir().display()
    );
    // While it is away a resume can be told neither exact nor a gap: 200, then a clean end at
    // once, the backend hearing connect then server_closed (the browser retries by itself).
    wait_readyz(&cl.nodes[C], SOON, 503).await;
    let within = Duration::from_secs(1);
    resume_ends_cleanly(&mut cl.backend, &cl.nodes[C], &ch, &p_old, within).await;

    cl.redis.restart().await;
    for k in ["history-clock", "history:r"] {
        assert_eq!(cl.redis.command(&["EXISTS", &key(k)]).await, ":0", "{k}");
    }
    cl.wait_joined(3, Duration::from_secs(10)).await;

    // A page that opened afresh on A, then B publishing, more than before: positions of the new
    // life. The same nodes as in the first life, in the same order: A's open was the first to
    // touch the position counter then (its start position) and is now again.
    let (mut fresh, fresh_token) = open_at(&mut cl.backend, &cl.nodes[A], &ch, None).await;
    for i in 0..5 {
        let data = format!("new {i}");
        assert_eq!(publish_ok(&cl.nodes[B], &event_to(&to_r, &data)).await, 1);
    }
    let new = next_events(&mut fresh, 5).await;
    assert_in_order(&new, None);
    assert_eq!(position(&new[0].last_event_id).seq, 1, "a new counter");
    leave(&mut cl.backend, fresh, &fresh_token).await;

    let (mut s, token) = open_at(&mut cl.backend, &cl.nodes[A], &ch, Some(&p_old)).await;
    let first = s.next_event(SOON).await;
    let g = assert_gap(&first, &p_old);
    assert_ne!(
        g.epoch,
        position(&p_old).epoch,
        "Redis lost its data: a new epoch"
    );
    let current = position(&new[4].last_event_id);
    assert_eq!(
        (&g.epoch, g.seq),
        (&current.epoch, current.seq),
        "the new life's current position"
    );
    expect_no_event(&mut s, QUIET).await;
    leave(&mut cl.backend, s, &token).await;

    // New positions resume exactly, on any node.
    let from = new[1].last_event_id.clone();
    let (mut again, _) = open_at(&mut cl.backend, &cl.nodes[B], &ch, Some(&from)).await;
    let replay = next_events(&mut again, 3).await;
    assert_eq!(datas(&replay), ["new 2", "new 3", "new 4"]);
    assert_eq!(ids(&replay), ids(&new[2..]), "the very frames");
    expect_no_event(&mut again, QUIET).await;
    assert_eq!(resumes(&cl.nodes[B], "complete").await, 1.0);
    assert_eq!(resumes(&cl.nodes[A], "gap").await, 1.0);
}

#[tokio::test]
async fn a_resume_while_redis_is_unreachable_ends_cleanly_and_resumes_exactly_once_it_is_back() {
    let mut cl = Cluster::start(2, with_history("100")).await;
    let ch = ["p"];
    let to_p = json!({"channel": "p"});
    let p0 = seen_then_left(&mut cl, "p", "e0").await.last_event_id;
    for data in ["e1", "e2"] {
        assert_eq!(publish_ok(&cl.nodes[B], &event_to(&to_p, data)).await, 0);
    }

    // Redis stops answering (SIGSTOP): first before the nodes noticed, then after.
    cl.redis.pause();
    let paused = Instant::now();
    let within = Duration::from_secs(4);
    resume_ends_cleanly(&mut cl.backend, &cl.nodes[B], &ch, &p0, within).await;
    eprintln!(
        "resume on a silent Redis ended after {:?}",
        paused.elapsed()
    );

    // Once the node knows Redis is unreachable (`/readyz` 503), at once: it has nothing to wait
    // for. Three times, spread over the node's rejoin attempts.
    wait_readyz(&cl.nodes[B], Duration::from_secs(6), 503).await;
    for attempt in 0..3 {
        let within = Duration::from_secs(3);
        let took = resume_ends_cleanly(&mut cl.backend, &cl.nodes[B], &ch, &p0, within).await;
        assert!(
            took < Duration::from_millis(500),
            "attempt {attempt}: a resume on a node that knows Redis is unreachable ended after \
             {took:?}, not at once"
        );
    }

    // Redis answers again, with its data: the node rejoins and the same position resumes.
    cl.redis.resume();
    for gw in &cl.nodes {
        wait_ready(gw, REJOIN).await;
    }
    let mut s = resume_exactly(&mut cl.backend, &cl.nodes[B], &ch, &p0, &["e1", "e2"]).await;
    assert_eq!(publish_ok(&cl.nodes[A], &event_to(&to_p, "live")).await, 1);
    assert_eq!(s.next_event(SOON).await.data, "live");
    assert_eq!(resumes(&cl.nodes[B], "complete").await, 1.0);
}

#[tokio::test]
async fn event_id_is_refused_and_the_history_keys_sit_under_the_prefix_with_a_ttl() {
    let db = 3;
    let mut cl = Cluster::start_in_db(db, 2, |b| {
        b.env("HISTORY_SIZE", "3")
            .env("HISTORY_TTL_SECONDS", "300")
            .env("HISTORY_MAX_BYTES", "4096")
    })
    .await;
    let (mut s, _) = open_at(&mut cl.backend, &cl.nodes[A], &["k"], None).await;
    let to_k = json!({"channel": "k"});
    assert_eq!(publish_ok(&cl.nodes[A], &event_to(&to_k, "first")).await, 1);
    let first = s.next_event(SOON).await;

    // A publish with its own id, through either node, alone or in a batch: 400 naming event.id,
    // and nothing delivered, nothing kept, no position taken.
    for gw in &cl.nodes {
        let with_id = json!({"channel": "k", "event": {"data": "mine", "id": "7"}});
        let r = publish(gw, &with_id).await;
        assert_eq!(r.status(), 400, "{}", r.text());
        let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            error.starts_with("Invalid request: ") && error.contains("event.id"),
            "{error}"
        );
        let mut item = with_id.clone();
        item["op"] = json!("publish");
        let r = gw
            .post("/internal/batch", &json!({ "requests": [item] }))
            .await;
        assert_eq!(r.status(), 200, "{}", r.text());
        let result = &r.json()["results"][0];
        assert_eq!(result["status"], json!(400), "{result}");
        assert!(
            result["body"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("event.id")),
            "{result}"
        );
    }
    // 2 KB each: more than HISTORY_MAX_BYTES together, which does not apply to Redis (§11.1).
    let big: Vec<String> = (0..3)
        .map(|i| format!("after {i} {}", "x".repeat(2000)))
        .collect();
    for data in &big {
        let body =
            json!({"channel": "k", "event": {"name": "big", "data": format!("{data}\nline 2")}});
        assert_eq!(publish_ok(&cl.nodes[B], &body).await, 1);
    }
    let after = next_events(&mut s, 3).await;
    let big: Vec<String> = big.iter().map(|d| format!("{d}\nline 2")).collect();
    assert_eq!(datas(&after), big);
    assert!(after.iter().all(|e| e.event == "big"), "{after:?}");
    assert_eq!(
        position(&after[0].last_event_id).seq,
        position(&first.last_event_id).seq + 1,
        "the refused publishes took no position"
    );
    assert_in_order(&after, Some(&first.last_event_id));

    // Four kept with HISTORY_SIZE 3: the list, its floor and the clock, all under the
    // deployment's prefix in its database, the channel's keys expiring.
    let prefix = format!("sse-gateway:{db}:");
    let Resp::Array(Some(keys)) = cl.redis.query_in(db, &["KEYS", "*history*"]).await else {
        panic!("KEYS answered no array");
    };
    let mut keys: Vec<String> = keys.into_iter().map(|k| k.short()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            format!("{prefix}history-clock"),
            format!("{prefix}history-floor:k"),
            format!("{prefix}history:k"),
        ]
    );
    assert_eq!(
        cl.redis.query(&["KEYS", "*history*"]).await,
        Resp::Array(Some(vec![])),
        "nothing in database 0"
    );
    let list = format!("{prefix}history:k");
    assert_eq!(cl.redis.query_in(db, &["LLEN", &list]).await, Resp::Int(3));
    for k in [list, format!("{prefix}history-floor:k")] {
        let Resp::Int(pttl) = cl.redis.query_in(db, &["PTTL", &k]).await else {
            panic!("PTTL {k}");
        };
        assert!(pttl > 0 && pttl <= 300_000, "PTTL {k} = {pttl}");
    }

    // All three replay from the first event's position, on the other node.
    let (mut again, _) = open_at(
        &mut cl.backend,
        &cl.nodes[B],
        &["k"],
        Some(&first.last_event_id),
    )
    .await;
    let replay = next_events(&mut again, 3).await;
    assert_eq!(ids(&replay), ids(&after));
    assert_eq!(datas(&replay), big);
    assert!(
        s.payload.ends_with(&again.payload),
        "the replay is the very bytes that were published: {:?} vs {:?}",
        String::from_utf8_lossy(&again.payload),
        String::from_utf8_lossy(&s.payload)
    );
    for gw in &cl.nodes {
        let m = gw.metrics().await;
        assert_eq!(m.get("sse_gateway_history_bytes", &[]), Some(0.0), "§11.1");
    }
}

/// Reads `stream` until it has `n` events; each must come within [`SOON`] of the previous.
async fn read_events(stream: &mut SseStream, n: u64) -> Vec<Event> {
    let mut got = Vec::new();
    while (got.len() as u64) < n {
        match stream.next_item(SOON).await {
            Ok(Item::Event(e)) => got.push(e),
            Ok(Item::Comment(_)) => {}
            Err(why) => panic!("after {} of {n} events: {why:?}", got.len()),
        }
    }
    got
}

#[tokio::test]
async fn a_burst_of_publishes_through_one_node_reaches_other_nodes_members_complete_and_in_order() {
    const SENDERS: u64 = 16;
    const EACH: u64 = 125;
    const TOTAL: u64 = SENDERS * EACH;
    let mut cl = Cluster::start(3, with_history("100")).await;
    let (mut on_a, _) = open_at(&mut cl.backend, &cl.nodes[A], &["burst"], None).await;
    let (mut on_c, _) = open_at(&mut cl.backend, &cl.nodes[C], &["burst"], None).await;

    // 2000 publishes through B as fast as 16 keep-alive connections go, read meanwhile.
    let start = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for j in 0..SENDERS {
        let addr = cl.nodes[B].control_addr();
        senders.spawn(async move {
            let mut conn = HttpConn::connect(addr).await;
            let mut incomplete = 0u64;
            for i in 0..EACH {
                let body = event_to(&json!({"channel": "burst"}), &seq_data(&format!("p{j}"), i));
                let r = conn.post_json("/internal/publish", &body).await;
                assert_eq!(r.status(), 200, "{body}: {}", r.text());
                let answer = r.json();
                if answer.get("complete") == Some(&json!(false)) {
                    // Late answers are allowed; the frames must still arrive (§11.1).
                    incomplete += 1;
                } else {
                    assert_eq!(answer, json!({"status": "ok", "delivered": 2}), "{body}");
                }
            }
            incomplete
        });
    }
    let publishers = async {
        let mut incomplete = 0;
        while let Some(n) = senders.join_next().await {
            incomplete += n.expect("a publisher panicked");
        }
        incomplete
    };
    let (incomplete, got_a, got_c) = tokio::join!(
        publishers,
        read_events(&mut on_a, TOTAL),
        read_events(&mut on_c, TOTAL)
    );
    eprintln!(
        "{TOTAL} publishes through B in {:?}, {incomplete} answered incomplete",
        start.elapsed()
    );
    for (name, got, stream) in [("A", got_a, &mut on_a), ("C", got_c, &mut on_c)] {
        assert_in_order(&got, None);
        let first = position(&got[0].last_event_id).seq;
        let last = position(&got[got.len() - 1].last_event_id).seq;
        assert_eq!((first, last), (1, TOTAL), "node {name}: none missing");
        for j in 0..SENDERS {
            let label = format!("p{j}");
            let seqs: Vec<u64> = got
                .iter()
                .filter_map(|e| parse_seq(&e.data).filter(|(l, _)| *l == label))
                .map(|(_, s)| s)
                .collect();
            assert_eq!(seqs, (0..EACH).collect::<Vec<_>>(), "node {name}, {label}");
        }
        let (more, _) = drain(stream, QUIET).await;
        assert!(more.is_empty(), "node {name}: nothing more: {more:?}");
    }
}

#[tokio::test]
async fn a_publish_a_frozen_node_answers_too_late_still_reaches_its_members_in_order() {
    const LATE: u64 = 20;
    let mut cl = Cluster::start(3, |b| {
        b.env("HISTORY_SIZE", "100")
            .env("CLUSTER_TIMEOUT_MS", "400")
    })
    .await;
    let (mut on_a, _) = open_at(&mut cl.backend, &cl.nodes[A], &["late"], None).await;
    let (mut on_c, _) = open_at(&mut cl.backend, &cl.nodes[C], &["late"], None).await;
    let to_late = json!({"channel": "late"});
    assert_eq!(
        publish_ok(&cl.nodes[B], &event_to(&to_late, "before")).await,
        2
    );
    let before = on_a.next_event(SOON).await;
    assert_eq!(on_c.next_event(SOON).await, before);

    // A freezes (SIGSTOP) for less than the 3 s that would count it out, while publishes go
    // through B at once: answered incomplete, counting C's member only. Redis took them, so A,
    // thawed, delivers every one, in position order (§11.1).
    cl.nodes[A].signal(libc::SIGSTOP);
    let mut publishes = tokio::task::JoinSet::new();
    for k in 0..LATE {
        let addr = cl.nodes[B].control_addr();
        let body = event_to(&to_late, &seq_data("late", k));
        publishes
            .spawn(async move { common::http::post_json(addr, "/internal/publish", &body).await });
    }
    while let Some(r) = publishes.join_next().await {
        let r = r.expect("a publish task panicked");
        r.assert_json(
            200,
            json!({"status": "ok", "delivered": 1, "complete": false}),
        );
    }
    cl.nodes[A].signal(libc::SIGCONT);
    let via_c = read_events(&mut on_c, LATE).await;
    let via_a = read_events(&mut on_a, LATE).await;
    assert_eq!(
        ids(&via_a),
        ids(&via_c),
        "the same events in the same order"
    );
    assert_in_order(&via_a, Some(&before.last_event_id));
    let seqs: Vec<u64> = via_a
        .iter()
        .map(|e| position(&e.last_event_id).seq)
        .collect();
    assert_eq!(seqs, (2..2 + LATE).collect::<Vec<_>>(), "none missing");
    let mut data: Vec<u64> = via_a
        .iter()
        .filter_map(|e| parse_seq(&e.data).map(|(_, k)| k))
        .collect();
    data.sort_unstable();
    assert_eq!(data, (0..LATE).collect::<Vec<_>>());

    // And the next publish is complete again, after them.
    assert_eq!(
        publish_ok(&cl.nodes[B], &event_to(&to_late, "after")).await,
        2
    );
    let after = on_a.next_event(SOON).await;
    assert_eq!(after.data, "after");
    assert_eq!(position(&after.last_event_id).seq, 2 + LATE);
}

#[tokio::test]
async fn a_new_stream_gets_every_publish_that_counted_it_as_delivered() {
    // §8: `delivered` counts the streams a publish was queued on; a stream that is counted must
    // get the event, also while it is being opened (joined, and given its start position).
    const ROUNDS: usize = 20;
    let mut cl = Cluster::start(2, with_history("1000")).await;
    let mut lost = Vec::new();
    for round in 0..ROUNDS {
        let channel = format!("fresh{round}");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        // Publishes to the channel through B, on four connections, each one after the other as
        // fast as they are answered: the ones answered `delivered: 1` were queued on the new
        // stream, its only member.
        let mut publishers = tokio::task::JoinSet::new();
        for j in 0..4 {
            let (addr, stop, channel) = (cl.nodes[B].control_addr(), stop.clone(), channel.clone());
            publishers.spawn(async move {
                let mut conn = HttpConn::connect(addr).await;
                let mut counted = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) && i < 20_000 {
                    let data = seq_data(&format!("f{j}"), i);
                    let body = json!({"channel": channel, "event": {"data": data}});
                    let r = conn.post_json("/internal/publish", &body).await;
                    assert_eq!(r.status(), 200, "{body}: {}", r.text());
                    match r.json()["delivered"].as_u64() {
                        Some(0) => {}
                        Some(1) => counted.push(data),
                        other => panic!("{body}: delivered {other:?}"),
                    }
                    i += 1;
                }
                counted
            });
        }
        let (mut s, token) = open_at(&mut cl.backend, &cl.nodes[A], &[&channel], None).await;
        let mut got = next_events(&mut s, 5).await;
        stop.store(true, Ordering::SeqCst);
        let mut counted = Vec::new();
        while let Some(c) = publishers.join_next().await {
            counted.extend(c.expect("a publisher panicked"));
        }
        // A last publish, after every counted one: once it is here, so are they (publish order).
        let marker = json!({"channel": channel, "event": {"data": "marker"}});
        assert_eq!(publish_ok(&cl.nodes[B], &marker).await, 1);
        while got.last().map(|e| e.data.as_str()) != Some("marker") {
            got.push(s.next_event(SOON).await);
        }
        assert_in_order(&got, None);
        let received: Vec<&str> = got.iter().map(|e| e.data.as_str()).collect();
        let missing: Vec<&String> = counted
            .iter()
            .filter(|d| !received.contains(&d.as_str()))
            .collect();
        if !missing.is_empty() {
            lost.push(format!(
                "round {round}: {missing:?} (first received {:?})",
                received.first()
            ));
        }
        leave(&mut cl.backend, s, &token).await;
    }
    assert!(
        lost.is_empty(),
        "publishes answered `delivered: 1` whose event never reached the new stream, their only \
         member: {lost:#?}"
    );
}

#[tokio::test]
async fn a_channel_named_clock_keeps_its_history_like_any_other() {
    // Channel names are any 1-256 visible ASCII bytes (§8): "clock" is one.
    let mut cl = Cluster::start(2, with_history("100")).await;
    let ch = ["clock"];
    let (mut s, token) = open_at(&mut cl.backend, &cl.nodes[A], &ch, None).await;
    let to_clock = json!({"channel": "clock"});
    let r = publish(&cl.nodes[B], &event_to(&to_clock, "tick")).await;
    r.assert_json(200, json!({"status": "ok", "delivered": 1}));
    let tick = s.next_event(SOON).await;
    assert_eq!(tick.data, "tick");
    leave(&mut cl.backend, s, &token).await;
    let r = publish(&cl.nodes[B], &event_to(&to_clock, "tock")).await;
    r.assert_json(200, json!({"status": "ok", "delivered": 0}));
    let (mut s, _) = open_at(
        &mut cl.backend,
        &cl.nodes[B],
        &ch,
        Some(&tick.last_event_id),
    )
    .await;
    let tock = s.next_event(SOON).await;
    assert_eq!(
        (tock.event.as_str(), tock.data.as_str()),
        ("message", "tock")
    );
    assert_in_order(&[tick, tock], None);
    expect_no_event(&mut s, QUIET).await;
    // And the deployment's other channels still publish.
    let r = publish(&cl.nodes[A], &event_to(&json!({"channel": "other"}), "x")).await;
    r.assert_json(200, json!({"status": "ok", "delivered": 0}));
}
