//! PROTOCOL §10 and §10.1 when things break: three real gateways on one real Redis, and Redis
//! killed then restarted on the same port, Redis paused with SIGSTOP for 10 s (a connection that
//! looks open and carries nothing), a node killed with SIGKILL, a node frozen with SIGSTOP (briefly:
//! a timeout; past its heartbeats: as after a power loss), a node drained with SIGTERM, nodes started
//! while Redis is down, a node with 100k channels rejoining.
//!
//! While Redis is away every publish and every request that needs another node is 503
//! `{"error":"Cluster unavailable"}` and delivers nothing, local sends still work, streams keep
//! their heartbeats, `/readyz` is 503 `redis:false`; when it is back every node rejoins by itself
//! within 2 s with its channel interest restored. Every publish is written down with its answer
//! (a ledger), every stream is read to its end, and each published event must have reached exactly
//! as many streams as its answer said (none for a 503), none of them twice.

mod common;

use std::time::Duration;

use common::cluster::{
    counts, drain, expect_no_event, not_found, not_ready_body, publish, publish_ok, ready_body,
    readyz, seq_data, unavailable, wait_readyz, Cluster, NODES, REDIS_UP,
};
use common::{End, GatewayBuilder, Item, NoItem, Redis, SseStream, SOON};
use serde_json::json;
use tokio::time::{timeout, Instant};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// §10: a node rejoins within 2 s of Redis being back; the slack covers the test's own polling.
const REJOIN: Duration = Duration::from_millis(2000);
const SLACK: Duration = Duration::from_millis(250);
/// §10: a silently dead Redis connection is noticed within 5 s.
const NOTICE_DEAD: Duration = Duration::from_secs(5);
/// A probe answers within this, whatever Redis does (Kubernetes' default probe timeout).
const PROBE: Duration = Duration::from_secs(1);
/// Long enough for a late (duplicated or resurrected) delivery to show.
const LATE: Duration = Duration::from_millis(1000);

fn heartbeats(b: GatewayBuilder) -> GatewayBuilder {
    b.env("HEARTBEAT_INTERVAL_SECONDS", "1")
}

/// What a publish was answered.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// 503 Cluster unavailable: must reach no stream.
    Refused,
    /// 200: `complete` ones reached exactly `delivered` streams, incomplete ones at least that.
    Delivered { delivered: u64, complete: bool },
}

/// Two members of channel `room`, on A and C, and what each got, in order (checked against the
/// ledger at the end of a fault test).
struct Rooms {
    a_room: SseStream,
    c_room: SseStream,
    ledger: Ledger,
    a_got: Vec<String>,
    c_got: Vec<String>,
}

impl Rooms {
    async fn open(cl: &mut Cluster) -> Rooms {
        let (a_room, _) = cl.open_in(A, "/a/room", &["room"]).await;
        let (c_room, _) = cl.open_in(C, "/c/room", &["room"]).await;
        Rooms {
            a_room,
            c_room,
            ledger: Ledger::default(),
            a_got: Vec::new(),
            c_got: Vec::new(),
        }
    }

    /// A publish through B before the fault, which both members get.
    async fn first_publish(mut self, cl: &Cluster) -> Rooms {
        assert_eq!(
            self.ledger.publish(&cl.nodes[B], "room", "room").await,
            Outcome::Delivered {
                delivered: 2,
                complete: true
            }
        );
        self.a_got.push(self.a_room.next_event(SOON).await.data);
        self.c_got.push(self.c_room.next_event(SOON).await.data);
        self
    }
}

/// After an outage: a send through A reaches C's stream `tc`, and the send that was refused
/// during the outage never arrives (nothing else is on that stream).
async fn refused_send_never_arrives(cl: &Cluster, tc: &str, c_direct: &mut SseStream) {
    cl.nodes[A]
        .send_ok(&json!({"token": tc, "event": {"data": "via A again"}}))
        .await;
    let (direct, _) = drain(c_direct, LATE).await;
    assert_eq!(direct, ["via A again"], "the refused send never arrives");
}

/// Every publish of a test with its answer, checked at the end against what the streams got.
#[derive(Debug, Default)]
struct Ledger {
    entries: Vec<(String, Outcome)>,
    next: u64,
}

impl Ledger {
    /// A publish to `room` through every node, each complete and reaching `delivered` streams.
    async fn publish_through_each(&mut self, cl: &Cluster, delivered: u64) {
        for gw in &cl.nodes {
            assert_eq!(
                self.publish(gw, "room", "room").await,
                Outcome::Delivered {
                    delivered,
                    complete: true
                }
            );
        }
    }

    /// Publishes `label#<next>` to `channel` through `gw`, records the answer and returns it.
    async fn publish(&mut self, gw: &common::Gateway, channel: &str, label: &str) -> Outcome {
        let data = seq_data(label, self.next);
        self.next += 1;
        let r = publish(gw, &json!({"channel": channel, "event": {"data": data}})).await;
        let outcome = match r.status() {
            503 => {
                r.assert_json(503, unavailable());
                Outcome::Refused
            }
            200 => {
                let answer = r.json();
                let delivered = answer["delivered"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("delivered is a count: {answer}"));
                let complete = match answer.get("complete") {
                    None => true,
                    Some(v) if *v == json!(false) => false,
                    Some(_) => panic!("\"complete\" is only ever false: {answer}"),
                };
                let mut want = json!({"status": "ok", "delivered": delivered});
                if !complete {
                    want["complete"] = json!(false);
                }
                assert_eq!(answer, want);
                Outcome::Delivered {
                    delivered,
                    complete,
                }
            }
            s => panic!("publish {data} through {}: {s} {}", gw.addr, r.text()),
        };
        self.entries.push((data, outcome.clone()));
        outcome
    }

    /// Each stream's events (`name`, data in arrival order): no event twice on one stream, and
    /// each published event on as many streams as its answer said.
    fn check(&self, streams: &[(&str, Vec<String>)]) {
        for (name, events) in streams {
            let dup: Vec<_> = counts(events).into_iter().filter(|(_, n)| *n > 1).collect();
            assert!(
                dup.is_empty(),
                "stream {name} got these more than once: {dup:?}; all: {events:?}"
            );
        }
        for (data, outcome) in &self.entries {
            let reached: Vec<&str> = streams
                .iter()
                .filter(|(_, events)| events.contains(data))
                .map(|(name, _)| *name)
                .collect();
            let n = reached.len() as u64;
            match outcome {
                Outcome::Refused => assert!(
                    reached.is_empty(),
                    "publish {data} was answered 503 but reached {reached:?}; ledger {:?}",
                    self.entries
                ),
                Outcome::Delivered {
                    delivered,
                    complete: true,
                } => assert_eq!(
                    n, *delivered,
                    "publish {data} answered delivered {delivered} but reached {reached:?}; ledger {:?}",
                    self.entries
                ),
                Outcome::Delivered {
                    delivered,
                    complete: false,
                } => assert!(
                    n >= *delivered,
                    "incomplete publish {data} counted {delivered} but reached {reached:?}"
                ),
            }
        }
    }

    /// After Redis came back at `since`: polls until every node is ready and a publish through
    /// `via` is complete and reaches `want` streams; panics past [`REJOIN`] (+ slack). Returns
    /// how long full service took.
    async fn until_full_service(
        &mut self,
        cl: &Cluster,
        via: usize,
        channel: &str,
        label: &str,
        want: u64,
        since: Instant,
    ) -> Duration {
        let mut last = String::new();
        loop {
            let mut ready = true;
            for gw in &cl.nodes {
                let r = readyz(gw).await;
                if r.status() != 200 {
                    ready = false;
                    last = format!("{} /readyz {} {}", gw.addr, r.status(), r.text());
                    break;
                }
            }
            if ready {
                let outcome = self.publish(&cl.nodes[via], channel, label).await;
                if outcome
                    == (Outcome::Delivered {
                        delivered: want,
                        complete: true,
                    })
                {
                    return since.elapsed();
                }
                last = format!("publish answered {outcome:?}");
            }
            if since.elapsed() > REJOIN + SLACK {
                panic!(
                    "no full service within {REJOIN:?} of Redis answering again; last: {last}; \
                     ledger {:?}",
                    self.entries
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `/readyz`, which must answer within [`PROBE`] whatever Redis does.
async fn probe(gw: &common::Gateway) -> common::Response {
    timeout(PROBE, readyz(gw)).await.unwrap_or_else(|_| {
        panic!(
            "/readyz of {} did not answer within {PROBE:?} (a probe must not wait on Redis)",
            gw.addr
        )
    })
}

/// Polls every node's `/readyz` until all are 503 `redis:false`; returns how long each took.
async fn until_all_not_ready(cl: &Cluster, since: Instant, within: Duration) -> Vec<Duration> {
    let mut noticed: Vec<Option<Duration>> = vec![None; cl.nodes.len()];
    loop {
        for (i, gw) in cl.nodes.iter().enumerate() {
            if noticed[i].is_none() {
                let r = probe(gw).await;
                if r.status() == 503 {
                    r.assert_json(503, not_ready_body());
                    noticed[i] = Some(since.elapsed());
                }
            }
        }
        if noticed.iter().all(Option::is_some) {
            return noticed.into_iter().map(Option::unwrap).collect();
        }
        if since.elapsed() > within {
            panic!("not every node reported Redis down within {within:?}: {noticed:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn redis_killed_mid_run_then_restarted_on_the_same_port() {
    let mut cl = Cluster::start(3, heartbeats).await;
    let rooms = Rooms::open(&mut cl).await;
    let (mut b_local, tb) = cl.open_in(B, "/b/local", &[]).await;
    let (mut c_direct, tc) = cl.open_in(C, "/c/direct", &[]).await;
    let Rooms {
        mut a_room,
        mut c_room,
        mut ledger,
        mut a_got,
        mut c_got,
    } = rooms.first_publish(&cl).await;

    cl.redis.kill().await;
    let killed = Instant::now();
    let noticed = until_all_not_ready(&cl, killed, NOTICE_DEAD).await;
    eprintln!("Redis killed: nodes reported not ready after {noticed:?}");
    for gw in &cl.nodes {
        assert_eq!(gw.metrics().await.get(REDIS_UP, &[]), Some(0.0));
    }

    // Every publish is refused and delivers nothing, whichever node it enters and wherever the
    // members are (A's own member included).
    for gw in &cl.nodes {
        assert_eq!(ledger.publish(gw, "room", "room").await, Outcome::Refused);
    }
    // A request that needs another node is refused; nothing of it arrives later.
    for path in [
        "/internal/send",
        "/internal/subscribe",
        "/internal/unsubscribe",
    ] {
        let body = if path == "/internal/send" {
            json!({"token": tc, "event": {"data": "refused"}})
        } else {
            json!({"token": tc, "channels": ["room"]})
        };
        for node in [A, B] {
            cl.nodes[node]
                .post(path, &body)
                .await
                .assert_json(503, unavailable());
        }
    }
    let batch = cl.nodes[A]
        .post(
            "/internal/batch",
            &json!({"requests": [{"op": "send", "token": tc, "event": {"data": "refused"}}]}),
        )
        .await;
    assert_eq!(batch.status(), 200, "{}", batch.text());
    assert_eq!(
        batch.json()["results"][0],
        json!({"status": 503, "body": {"error": "Cluster unavailable"}})
    );
    // Sends to local tokens still work, on every node that holds one.
    cl.nodes[B]
        .send_ok(&json!({"token": tb, "event": {"data": "local on B"}}))
        .await;
    assert_eq!(b_local.next_event(SOON).await.data, "local on B");
    cl.nodes[C]
        .send_ok(&json!({"token": tc, "event": {"data": "local on C"}}))
        .await;
    assert_eq!(c_direct.next_event(SOON).await.data, "local on C");
    // A local stream joins a channel while Redis is away (it needs no other node)...
    cl.nodes[B]
        .post(
            "/internal/subscribe",
            &json!({"token": tb, "channels": ["room"]}),
        )
        .await
        .assert_json(200, json!({"status": "ok"}));
    // ...and the streams stay open, with their heartbeats and no event.
    for (name, stream) in [("a_room", &mut a_room), ("c_room", &mut c_room)] {
        let beats = expect_no_event(stream, Duration::from_millis(2500)).await;
        assert!(beats >= 1, "{name}: no heartbeat while Redis was down");
    }

    cl.redis.restart().await;
    let back = Instant::now();
    // Full service: every node ready, and the room (A's, C's, and B's member that joined during
    // the outage) reached by one complete publish.
    let took = ledger
        .until_full_service(&cl, B, "room", "room", 3, back)
        .await;
    eprintln!("Redis back: full service after {took:?}");
    for gw in &cl.nodes {
        probe(gw).await.assert_json(200, ready_body());
    }
    cl.wait_joined(3, SOON).await;
    for gw in &cl.nodes {
        assert_eq!(gw.metrics().await.get(REDIS_UP, &[]), Some(1.0));
    }
    // Interest restored on every node: a publish through each reaches all three.
    ledger.publish_through_each(&cl, 3).await;
    refused_send_never_arrives(&cl, &tc, &mut c_direct).await;

    a_got.extend(drain(&mut a_room, LATE).await.0);
    c_got.extend(drain(&mut c_room, LATE).await.0);
    let (b, _) = drain(&mut b_local, LATE).await;
    ledger.check(&[("a_room", a_got), ("c_room", c_got), ("b_local", b)]);
}

#[tokio::test]
async fn redis_paused_for_10_s_is_noticed_and_nothing_is_delivered_twice() {
    let mut cl = Cluster::start(3, heartbeats).await;
    let rooms = Rooms::open(&mut cl).await;
    let (mut c_direct, tc) = cl.open_in(C, "/c/direct", &[]).await;
    let Rooms {
        mut a_room,
        mut c_room,
        mut ledger,
        mut a_got,
        mut c_got,
    } = rooms.first_publish(&cl).await;

    cl.redis.pause();
    let paused = Instant::now();
    let noticed = until_all_not_ready(&cl, paused, NOTICE_DEAD + SLACK).await;
    eprintln!("Redis paused: nodes reported not ready after {noticed:?}");
    for gw in &cl.nodes {
        let m = gw.metrics().await;
        assert_eq!(m.get(REDIS_UP, &[]), Some(0.0), "{}", m.text);
    }
    for gw in &cl.nodes {
        let start = Instant::now();
        assert_eq!(ledger.publish(gw, "room", "room").await, Outcome::Refused);
        assert!(
            start.elapsed() < PROBE,
            "a refused publish took {:?}",
            start.elapsed()
        );
    }
    cl.nodes[A]
        .send(&json!({"token": tc, "event": {"data": "refused"}}))
        .await
        .assert_json(503, unavailable());
    cl.nodes[C]
        .send_ok(&json!({"token": tc, "event": {"data": "local on C"}}))
        .await;
    assert_eq!(c_direct.next_event(SOON).await.data, "local on C");
    // The rest of the 10 s: streams open, heartbeats, no event, /readyz stays 503.
    let resume_at = paused + Duration::from_secs(10);
    let beats = expect_no_event(
        &mut a_room,
        resume_at.saturating_duration_since(Instant::now()),
    )
    .await;
    assert!(beats >= 1, "no heartbeat on A while Redis was paused");
    for gw in &cl.nodes {
        probe(gw).await.assert_json(503, not_ready_body());
    }

    cl.redis.resume();
    let back = Instant::now();
    let took = ledger
        .until_full_service(&cl, A, "room", "room", 2, back)
        .await;
    eprintln!("Redis resumed: full service after {took:?}");
    cl.wait_joined(3, SOON).await;
    ledger.publish_through_each(&cl, 2).await;
    refused_send_never_arrives(&cl, &tc, &mut c_direct).await;

    // Whatever Redis had buffered while paused must not show up now.
    a_got.extend(drain(&mut a_room, LATE).await.0);
    c_got.extend(drain(&mut c_room, LATE).await.0);
    ledger.check(&[("a_room", a_got), ("c_room", c_got)]);
}

#[tokio::test]
async fn a_node_killed_with_sigkill_holds_nothing_within_cluster_timeout() {
    const CLUSTER_TIMEOUT: Duration = Duration::from_millis(500);
    let mut cl = Cluster::start(3, |b| heartbeats(b).env("CLUSTER_TIMEOUT_MS", "500")).await;
    let (mut a_room, _) = cl.open_in(A, "/a/room", &["room"]).await;
    let (mut c_room, tc_room) = cl.open_in(C, "/c/room", &["room"]).await;
    let (mut c_direct, tc) = cl.open_in(C, "/c/direct", &[]).await;
    cl.nodes[A]
        .send_ok(&json!({"token": tc, "event": {"data": "before"}}))
        .await;
    assert_eq!(c_direct.next_event(SOON).await.data, "before");
    assert_eq!(
        publish_ok(
            &cl.nodes[A],
            &json!({"channel": "room", "event": {"data": "p0"}})
        )
        .await,
        2
    );
    assert_eq!(a_room.next_event(SOON).await.data, "p0");
    assert_eq!(c_room.next_event(SOON).await.data, "p0");

    cl.nodes[C].signal(libc::SIGKILL);
    cl.nodes[C].wait_exit(SOON).await;
    let killed = Instant::now();
    for stream in [&mut c_room, &mut c_direct] {
        // A heartbeat already on its way before the kill may come first.
        let mut item = stream.next_item(SOON).await;
        while matches!(item, Ok(Item::Comment(_))) {
            item = stream.next_item(SOON).await;
        }
        assert_eq!(item, Err(NoItem::Ended(End::Abrupt)));
    }

    // C's tokens are 404 from A and B: within CLUSTER_TIMEOUT_MS of the death, not a 504.
    let start = Instant::now();
    let r = cl.nodes[A]
        .send(&json!({"token": tc, "event": {"data": "to the dead"}}))
        .await;
    let took = start.elapsed();
    r.assert_json(404, not_found());
    eprintln!(
        "send via A to a token of the killed node: 404 after {took:?} ({:?} after the kill)",
        killed.elapsed()
    );
    assert!(
        took < CLUSTER_TIMEOUT + SLACK,
        "the 404 took {took:?} (CLUSTER_TIMEOUT_MS=500)"
    );
    for (node, body, path) in [
        (
            B,
            json!({"token": tc_room, "event": {"data": "x"}}),
            "/internal/send",
        ),
        (
            A,
            json!({"token": tc_room, "channels": ["x"]}),
            "/internal/subscribe",
        ),
        (
            B,
            json!({"token": tc, "channels": ["room"]}),
            "/internal/unsubscribe",
        ),
    ] {
        let start = Instant::now();
        cl.nodes[node]
            .post(path, &body)
            .await
            .assert_json(404, not_found());
        assert!(start.elapsed() < CLUSTER_TIMEOUT + SLACK);
    }

    // A publish no longer counts C's streams, and is complete.
    let start = Instant::now();
    assert_eq!(
        publish_ok(
            &cl.nodes[A],
            &json!({"channel": "room", "event": {"data": "p1"}})
        )
        .await,
        1
    );
    assert!(
        start.elapsed() < CLUSTER_TIMEOUT + SLACK,
        "the publish took {:?}",
        start.elapsed()
    );
    assert_eq!(a_room.next_event(SOON).await.data, "p1");

    // The survivors count two nodes; the killed node sent no disconnect callbacks (§10.1).
    for node in [A, B] {
        cl.nodes[node]
            .wait_metrics(SOON, |m| m.get(NODES, &[]) == Some(2.0))
            .await;
    }
    eprintln!(
        "cluster_nodes reached 2 {:?} after the kill",
        killed.elapsed()
    );
    cl.backend.expect_none(Duration::from_millis(300)).await;
    for node in [A, B] {
        probe(&cl.nodes[node]).await.assert_json(200, ready_body());
    }
}

#[tokio::test]
async fn a_frozen_holder_is_a_cluster_timeout_and_an_incomplete_publish() {
    const CLUSTER_TIMEOUT: Duration = Duration::from_millis(500);
    let mut cl = Cluster::start(3, |b| heartbeats(b).env("CLUSTER_TIMEOUT_MS", "500")).await;
    let (mut a_room, _) = cl.open_in(A, "/a/room", &["room"]).await;
    let (mut c_room, tc) = cl.open_in(C, "/c/room", &["room"]).await;

    cl.nodes[C].signal(libc::SIGSTOP);
    let start = Instant::now();
    let r = cl.nodes[A]
        .send(&json!({"token": tc, "event": {"data": "to the frozen"}}))
        .await;
    let took = start.elapsed();
    r.assert_json(504, json!({"error": "Cluster timeout"}));
    assert!(
        took >= CLUSTER_TIMEOUT - Duration::from_millis(50) && took < CLUSTER_TIMEOUT + SLACK * 2,
        "504 after {took:?} (CLUSTER_TIMEOUT_MS=500)"
    );

    let start = Instant::now();
    let r = publish(
        &cl.nodes[B],
        &json!({"channel": "room", "event": {"data": "partial"}}),
    )
    .await;
    let took = start.elapsed();
    r.assert_json(
        200,
        json!({"status": "ok", "delivered": 1, "complete": false}),
    );
    assert!(
        took < CLUSTER_TIMEOUT + SLACK * 2,
        "incomplete publish answered after {took:?}"
    );
    assert_eq!(a_room.next_event(SOON).await.data, "partial");

    cl.nodes[C].signal(libc::SIGCONT);
    // C answers again: complete publishes and sends through A.
    let deadline = Instant::now() + SOON;
    loop {
        let r = publish(
            &cl.nodes[B],
            &json!({"channel": "room", "event": {"data": "whole"}}),
        )
        .await;
        if r.json() == json!({"status": "ok", "delivered": 2}) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C never answered again: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cl.nodes[A]
        .send_ok(&json!({"token": tc, "event": {"data": "thawed"}}))
        .await;
    let (got, _) = drain(&mut c_room, LATE).await;
    assert!(
        got.ends_with(&["whole".to_owned(), "thawed".to_owned()]),
        "{got:?}"
    );
}

/// §10: "A node whose Redis is unreachable at start-up starts anyway and reports not ready until it
/// connects." Two nodes started while Redis is down serve local streams, refuse what needs the
/// cluster, and join within 2 s of Redis answering.
#[tokio::test]
async fn nodes_started_while_redis_is_down_join_when_it_comes() {
    let mut redis = Redis::start().await;
    redis.kill().await;
    let mut backend = common::Backend::start().await;
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(
            heartbeats(common::Gateway::builder().callback(&backend))
                .env("REDIS_URL", redis.url())
                .spawn()
                .await,
        );
    }
    for gw in &nodes {
        probe(gw).await.assert_json(503, not_ready_body());
        let m = gw.metrics().await;
        assert_eq!(m.get(REDIS_UP, &[]), Some(0.0), "{}", m.text);
    }
    backend.on_connect(common::Reply::ok().body(json!({"channels": ["room"]}).to_string()));
    let (mut s0, t0) = nodes[0].open(&mut backend, "/n0").await;
    let (mut s1, t1) = nodes[1].open(&mut backend, "/n1").await;
    nodes[0]
        .send_ok(&json!({"token": t0, "event": {"data": "local"}}))
        .await;
    assert_eq!(s0.next_event(SOON).await.data, "local");
    nodes[0]
        .send(&json!({"token": t1, "event": {"data": "refused"}}))
        .await
        .assert_json(503, unavailable());
    publish(
        &nodes[1],
        &json!({"channel": "room", "event": {"data": "refused"}}),
    )
    .await
    .assert_json(503, unavailable());

    redis.restart().await;
    let back = Instant::now();
    for gw in &nodes {
        let took = wait_readyz(gw, REJOIN + SLACK, 200).await;
        eprintln!("a node started while Redis was down: ready {took:?} after Redis answered");
    }
    probe(&nodes[0]).await.assert_json(200, ready_body());
    assert!(back.elapsed() < REJOIN + SLACK);
    common::cluster::wait_joined(&nodes, 2, SOON).await;
    assert_eq!(
        publish_ok(
            &nodes[0],
            &json!({"channel": "room", "event": {"data": "both"}})
        )
        .await,
        2
    );
    nodes[0]
        .send_ok(&json!({"token": t1, "event": {"data": "across"}}))
        .await;
    assert_eq!(drain(&mut s0, LATE).await.0, ["both"]);
    assert_eq!(drain(&mut s1, LATE).await.0, ["both", "across"]);
}

/// Tokens name their node: nodes that start at the same moment, or while Redis is down, must
/// still end up with distinct identities, or a node takes another's tokens for its own (404).
/// 48 nodes started while Redis is down, then Redis: every node reaches every other's stream.
/// (Were each node to pick its identity at random among 256, two of 48 would share one in 99% of
/// runs.)
#[tokio::test]
async fn many_nodes_started_while_redis_is_down_reach_each_others_streams() {
    const N: usize = 48;
    let start = Instant::now();
    let mut redis = Redis::start().await;
    redis.kill().await;
    let mut backend = common::Backend::start().await;
    let mut nodes = Vec::new();
    for _ in 0..N {
        nodes.push(
            common::Gateway::builder()
                .callback(&backend)
                .env("REDIS_URL", redis.url())
                .env("WORKER_THREADS", "1")
                .spawn()
                .await,
        );
    }
    let spawned = start.elapsed();
    redis.restart().await;
    common::cluster::wait_joined(&nodes, N, Duration::from_secs(15)).await;
    eprintln!(
        "{N} nodes: spawned in {spawned:?}, joined {:?} after start",
        start.elapsed()
    );
    let mut streams = Vec::new();
    for (i, gw) in nodes.iter().enumerate() {
        streams.push(gw.open(&mut backend, &format!("/n{i}")).await);
    }
    let mut wrong = Vec::new();
    for (i, gw) in nodes.iter().enumerate() {
        let mut sender = common::cluster::Sender::connect(gw).await;
        for (j, (_, token)) in streams.iter().enumerate() {
            let r = sender
                .post(
                    "/internal/send",
                    &json!({"token": token, "event": {"data": format!("{i}->{j}")}}),
                )
                .await;
            if r.status() != 200 {
                wrong.push(format!(
                    "via node {i} to node {j}'s token {token}: {} {}",
                    r.status(),
                    r.text()
                ));
            }
        }
    }
    if !wrong.is_empty() {
        // What each node says it joined as (its log), to show which identities collided.
        let joined: Vec<String> = nodes
            .iter()
            .enumerate()
            .map(|(i, gw)| {
                let line = gw
                    .logs
                    .lines()
                    .into_iter()
                    .rfind(|l| l.contains("joined Redis"))
                    .unwrap_or_default();
                format!("node {i}: {line}")
            })
            .collect();
        panic!(
            "{} of {} sends failed:\n{}\nthe nodes' join lines:\n{}",
            wrong.len(),
            N * N,
            wrong.join("\n"),
            joined.join("\n")
        );
    }
    for (j, (stream, _)) in streams.iter_mut().enumerate() {
        let (got, _) = drain(stream, Duration::from_millis(300)).await;
        let want: Vec<String> = (0..N).map(|i| format!("{i}->{j}")).collect();
        assert_eq!(counts(&got).len(), N, "node {j}'s stream: {got:?}");
        let mut got = got;
        got.sort();
        let mut want = want;
        want.sort();
        assert_eq!(got, want);
    }
}

/// §10.1: a drained node (SIGTERM) ends its streams cleanly with their server_closed callbacks,
/// as one gateway does (§7), and holds nothing afterwards: its tokens are 404 from the others.
#[tokio::test]
async fn a_drained_node_sends_its_disconnects_and_then_holds_nothing() {
    let mut cl = Cluster::start(3, heartbeats).await;
    let (mut a_room, _) = cl.open_in(A, "/a/room", &["room"]).await;
    let (mut c_room, tc_room) = cl.open_in(C, "/c/room", &["room"]).await;
    let (mut c_direct, tc) = cl.open_in(C, "/c/direct", &[]).await;

    cl.nodes[C].signal(libc::SIGTERM);
    for stream in [&mut c_room, &mut c_direct] {
        let (end, _) = stream.end(SOON).await;
        assert_eq!(end, End::Clean);
    }
    let mut closed = Vec::new();
    for _ in 0..2 {
        let cb = cl.backend.next().await;
        assert_eq!(
            (cb.action(), cb.reason()),
            ("disconnect", Some("server_closed"))
        );
        closed.push(cb.token().to_owned());
    }
    closed.sort();
    let mut want = vec![tc_room.clone(), tc.clone()];
    want.sort();
    assert_eq!(closed, want);
    let status = cl.nodes[C].wait_exit(SOON).await;
    assert_eq!(status.code(), Some(0));

    for token in [&tc, &tc_room] {
        let start = Instant::now();
        cl.nodes[A]
            .send(&json!({"token": token, "event": {"data": "x"}}))
            .await
            .assert_json(404, not_found());
        assert!(start.elapsed() < PROBE, "took {:?}", start.elapsed());
    }
    assert_eq!(
        publish_ok(
            &cl.nodes[B],
            &json!({"channel": "room", "event": {"data": "p"}})
        )
        .await,
        1
    );
    assert_eq!(a_room.next_event(SOON).await.data, "p");
    for node in [A, B] {
        cl.nodes[node]
            .wait_metrics(SOON, |m| m.get(NODES, &[]) == Some(2.0))
            .await;
    }
}

/// The bound on a rejoin: a node holding 100k channels is back, with all of them, within
/// §10's 2 s of Redis' return (subscribe commands batched, not one round trip each).
#[tokio::test]
async fn a_node_with_100k_channels_rejoins_within_2_s_of_a_redis_restart() {
    const CHANNELS: usize = 100_000;
    let mut cl = Cluster::start(2, |b| b.env("MAX_CHANNELS_PER_STREAM", "100000")).await;
    let (mut on_a, token) = cl.open_in(A, "/a/many", &[]).await;
    let names: Vec<String> = (0..CHANNELS).map(|i| format!("ch-{i}")).collect();
    for chunk in names.chunks(10_000) {
        cl.nodes[A]
            .post(
                "/internal/subscribe",
                &json!({"token": token, "channels": chunk}),
            )
            .await
            .assert_json(200, json!({"status": "ok"}));
    }
    let probes = ["ch-0", "ch-50000", "ch-99999"];
    let mut ledger = Ledger::default();
    for name in probes {
        let deadline = Instant::now() + SOON;
        while ledger.publish(&cl.nodes[B], name, name).await
            != (Outcome::Delivered {
                delivered: 1,
                complete: true,
            })
        {
            assert!(Instant::now() < deadline, "{name} never reached A's stream");
        }
    }

    cl.redis.kill().await;
    until_all_not_ready(&cl, Instant::now(), NOTICE_DEAD).await;
    cl.redis.restart().await;
    let back = Instant::now();
    let mut took = Duration::ZERO;
    for name in probes {
        took = ledger.until_full_service(&cl, B, name, name, 1, back).await;
    }
    eprintln!("a node with {CHANNELS} channels: full service {took:?} after Redis answered");
    let (got, _) = drain(&mut on_a, LATE).await;
    ledger.check(&[("a_many", got)]);
}

/// §10.1: "a node killed without a drain (SIGKILL, power loss) ... the backend sees those tokens
/// 404 from then on"; §10: "A node that died holds nothing: its tokens are 404, not timeouts, once
/// the others notice". A machine that loses power closes no TCP connection: to Redis and to the
/// other nodes it looks exactly like a process frozen with SIGSTOP (its Redis connection stays
/// open and carries nothing). Once the others have counted it out (`sse_gateway_cluster_nodes`),
/// its tokens must be 404 and publishes complete, not 504s and `complete:false` after waiting
/// CLUSTER_TIMEOUT_MS on every request, for as long as Redis keeps the dead connection.
#[tokio::test]
async fn a_node_silent_like_after_a_power_loss_holds_nothing_once_counted_out() {
    const CLUSTER_TIMEOUT: Duration = Duration::from_millis(500);
    let mut cl = Cluster::start(3, |b| heartbeats(b).env("CLUSTER_TIMEOUT_MS", "500")).await;
    let (mut a_room, _) = cl.open_in(A, "/a/room", &["room"]).await;
    let (_c_room, _) = cl.open_in(C, "/c/room", &["room"]).await;
    let (_c_direct, tc) = cl.open_in(C, "/c/direct", &[]).await;

    cl.nodes[C].signal(libc::SIGSTOP);
    let silent = Instant::now();
    for node in [A, B] {
        cl.nodes[node]
            .wait_metrics(Duration::from_secs(15), |m| m.get(NODES, &[]) == Some(2.0))
            .await;
    }
    eprintln!("a silent node counted out after {:?}", silent.elapsed());

    let start = Instant::now();
    let r = cl.nodes[A]
        .send(&json!({"token": tc, "event": {"data": "to the silent"}}))
        .await;
    let took = start.elapsed();
    let start = Instant::now();
    let p = publish(
        &cl.nodes[B],
        &json!({"channel": "room", "event": {"data": "p"}}),
    )
    .await;
    let publish_took = start.elapsed();
    cl.nodes[C].signal(libc::SIGCONT);
    let observed = format!(
        "send: {} {} after {took:?}; publish: {} {} after {publish_took:?}",
        r.status(),
        r.text(),
        p.status(),
        p.text()
    );
    eprintln!("a node counted out: {observed}");
    assert!(
        r.status() == 404 && took < CLUSTER_TIMEOUT,
        "send to a counted-out node's token, want 404 at once; {observed}"
    );
    assert!(
        p.status() == 200
            && p.json() == json!({"status": "ok", "delivered": 1})
            && publish_took < CLUSTER_TIMEOUT,
        "publish, want complete with delivered 1 at once; {observed}"
    );
    assert_eq!(a_room.next_event(SOON).await.data, "p");
}
