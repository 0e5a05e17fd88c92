//! PROTOCOL §11: Last-Event-ID resume from channel history on one node. Real gateway binary, backend
//! double answering channel lists, independent SSE parser (its `last_event_id` is what a browser's
//! `EventSource` would send back on reconnect).
//!
//! Covered: exact resume in one and in three channels (the replayed frames byte for byte as
//! published); resume while publishing at 2000 events/s with reconnects at arbitrary points; the
//! gap (too old, dropped in one of several channels, unknown, ahead, from a restarted process, past
//! the TTL, forgotten by the byte bound, larger than the queue bound) always first and followed by
//! an exact resume from its id; publishes racing the connect callback, the join, and the replay
//! (also publishes that close); a new stream's position block; `HISTORY_MAX_BYTES` under 10 000
//! channels; the settings' bounds; permissions decided by the reconnect's callback; `event.id`
//! refused in publishes, and an empty one in sends, with history on; history off; the
//! `last_event_id` query parameter; per-token sends and positions; streams without channels.

mod common;

use std::net::SocketAddr;
use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::http::{get, open_stream_with, HttpConn};
use common::{
    data_of_next, last_event_id_header, next_events, no_event_within, Backend, Callback, Gateway,
    Item, Metrics, Reply, SseStream, SOON,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

const QUIET: Duration = Duration::from_millis(300);

async fn history_gateway(backend: &Backend, size: &str) -> Gateway {
    history_gateway_with(backend, size, &[]).await
}

/// As [`history_gateway`], with `extra` settings.
async fn history_gateway_with(backend: &Backend, size: &str, extra: &[(&str, &str)]) -> Gateway {
    let mut builder = Gateway::builder()
        .callback(backend)
        .env("HISTORY_SIZE", size);
    for (key, value) in extra {
        builder = builder.env(key, *value);
    }
    builder.spawn().await
}

async fn publish(gw: &Gateway, body: Value) -> u64 {
    let r = gw.post("/internal/publish", &body).await;
    assert_eq!(r.status(), 200, "publish {body}: {}", r.text());
    r.json()["delivered"].as_u64().expect("delivered")
}

/// Publishes `data` to `channel`.
async fn publish_to(gw: &Gateway, channel: &str, data: &str) -> u64 {
    publish(gw, json!({"channel": channel, "event": {"data": data}})).await
}

/// Opens `GET target` with `headers`, the backend putting the stream in `channels`; returns the
/// stream and its connect callback. Disconnect callbacks of streams dropped earlier may still be
/// on their way: they are skipped.
async fn open_at(
    gw: &Gateway,
    backend: &mut Backend,
    target: &str,
    channels: &[&str],
    headers: &[(&str, &[u8])],
) -> (SseStream, Callback) {
    backend.on_connect(Reply::ok().body(json!({ "channels": channels }).to_string()));
    let stream = open_stream_with(gw.addr, target, headers, None)
        .await
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status(), r.text()));
    let connect = next_connect(backend).await;
    (stream, connect)
}

/// The next connect callback, skipping disconnects.
async fn next_connect(backend: &mut Backend) -> Callback {
    loop {
        let cb = backend.next().await;
        match cb.action() {
            "connect" => return cb,
            "disconnect" => continue,
            other => panic!("unexpected callback {other:?}: {:?}", cb.body),
        }
    }
}

/// Opens a stream the backend puts in `channels`, coming back with `last_event_id` (if any) in
/// the `Last-Event-ID` header.
async fn open(
    gw: &Gateway,
    backend: &mut Backend,
    channels: &[&str],
    last_event_id: Option<&str>,
) -> SseStream {
    let headers = last_event_id_header(last_event_id);
    open_at(gw, backend, "/s", channels, &headers).await.0
}

/// As [`open`], also returning the stream's token.
async fn open_token(
    gw: &Gateway,
    backend: &mut Backend,
    channels: &[&str],
    last_event_id: Option<&str>,
) -> (SseStream, String) {
    let headers = last_event_id_header(last_event_id);
    let (stream, cb) = open_at(gw, backend, "/s", channels, &headers).await;
    (stream, cb.token().to_owned())
}

/// Starts opening a stream with `Last-Event-ID: last` in a task, the backend answering its connect
/// callback with channel `a` after `delay`; returns once that callback has arrived, for a test
/// that acts while the callback is in flight.
async fn open_with_slow_connect(
    gw: &Gateway,
    backend: &mut Backend,
    last: &str,
    delay: Duration,
) -> JoinHandle<SseStream> {
    backend.on_connect(
        Reply::ok()
            .body(json!({"channels": ["a"]}).to_string())
            .delay(delay),
    );
    let (addr, last) = (gw.addr, last.to_owned());
    let opening = tokio::spawn(async move {
        open_stream_with(addr, "/s", &[("Last-Event-ID", last.as_bytes())], None)
            .await
            .unwrap_or_else(|r| panic!("refused: {} {}", r.status(), r.text()))
    });
    next_connect(backend).await;
    opening
}

/// Drops `stream` and waits for its `client_closed` disconnect callback.
async fn leave(backend: &mut Backend, stream: SseStream) {
    drop(stream);
    let cb = backend.next().await;
    assert_eq!(cb.action(), "disconnect", "{:?}", cb.body);
    assert_eq!(cb.reason(), Some("client_closed"), "{:?}", cb.body);
}

/// The next event, which must be `gateway.gap` for `last_event_id` (as sent); returns its id.
#[track_caller]
fn expect_gap<'a>(
    stream: &'a mut SseStream,
    last_event_id: &'a str,
) -> impl std::future::Future<Output = String> + 'a {
    gap_at(stream, last_event_id, Location::caller())
}

/// [`expect_gap`], failures naming `caller`.
async fn gap_at(
    stream: &mut SseStream,
    last_event_id: &str,
    caller: &'static Location<'static>,
) -> String {
    let gap = stream.next_event(SOON).await;
    assert_eq!(gap.event, "gateway.gap", "{caller}: {gap:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&gap.data)
            .unwrap_or_else(|e| panic!("{caller}: gap data not JSON ({e}): {gap:?}")),
        json!({ "last_event_id": last_event_id }),
        "{caller}"
    );
    assert!(
        !gap.last_event_id.is_empty() && gap.last_event_id != last_event_id,
        "{caller}: the gap names the current position: {gap:?}"
    );
    gap.last_event_id
}

/// Opens a stream in `channels` and publishes `data` to the first of them; returns the stream and
/// the id it got for that event: its position.
async fn open_and_take_position(
    gw: &Gateway,
    backend: &mut Backend,
    channels: &[&str],
    data: &str,
) -> (SseStream, String) {
    let mut stream = open(gw, backend, channels, None).await;
    publish_to(gw, channels[0], data).await;
    let position = stream.next_event(SOON).await.last_event_id;
    (stream, position)
}

/// [`open_and_take_position`], and then the page leaves (its disconnect callback heard); returns
/// its position.
async fn position_before_leaving(
    gw: &Gateway,
    backend: &mut Backend,
    channels: &[&str],
    data: &str,
) -> String {
    let (first, position) = open_and_take_position(gw, backend, channels, data).await;
    leave(backend, first).await;
    position
}

/// A gateway with `HISTORY_SIZE=2`, a watcher in `a` that stays, and a page in `a` that got "0"
/// and left before "1" to "5" were published: its position is older than what is kept. Returns
/// the backend, the gateway, the watcher (all six events still to be read) and that position.
async fn a_page_older_than_what_is_kept() -> (Backend, Gateway, SseStream, String) {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "2").await;
    let watcher = open(&gw, &mut backend, &["a"], None).await;
    let position = position_before_leaving(&gw, &mut backend, &["a"], "0").await;
    for i in 1..=5 {
        publish_to(&gw, "a", &i.to_string()).await;
    }
    (backend, gw, watcher, position)
}

/// A stream in `channels` coming back from `last`, which must get the gap event first and then
/// nothing within [`QUIET`]; returns it and the gap's id.
#[track_caller]
fn resume_to_a_gap<'a>(
    gw: &'a Gateway,
    backend: &'a mut Backend,
    channels: &'a [&'a str],
    last: &'a str,
) -> impl std::future::Future<Output = (SseStream, String)> + 'a {
    let caller = Location::caller();
    async move {
        let mut stream = open(gw, backend, channels, Some(last)).await;
        let gap_id = gap_at(&mut stream, last, caller).await;
        no_event_within(&mut stream, QUIET).await;
        (stream, gap_id)
    }
}

/// A stream in `channels` coming back from `last`, which must get exactly the events with data
/// `want` replayed, in that order, and then nothing within [`QUIET`]; returns it.
#[track_caller]
fn resume_exactly<'a>(
    gw: &'a Gateway,
    backend: &'a mut Backend,
    channels: &'a [&'a str],
    last: &'a str,
    want: &'a [&'a str],
) -> impl std::future::Future<Output = SseStream> + 'a {
    let caller = Location::caller();
    async move {
        let mut stream = open(gw, backend, channels, Some(last)).await;
        let replayed = data_of_next(&mut stream, want.len()).await;
        assert_eq!(replayed, want, "{caller}: the replay from {last}");
        no_event_within(&mut stream, QUIET).await;
        stream
    }
}

/// `sse_gateway_resumes_total` as (complete, gap).
fn resumes(m: &Metrics) -> (f64, f64) {
    (
        m.value("sse_gateway_resumes_total", &[("result", "complete")]),
        m.value("sse_gateway_resumes_total", &[("result", "gap")]),
    )
}

/// The blocks of an event-stream payload, each with its blank line; heartbeats left out.
fn blocks(payload: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(payload)
        .split_inclusive("\n\n")
        .filter(|block| !block.starts_with(':'))
        .map(str::to_owned)
        .collect()
}

/// The event frames of a payload: [`blocks`] with data (not the position block a new stream in
/// channels starts with).
fn frames(payload: &[u8]) -> Vec<String> {
    blocks(payload)
        .into_iter()
        .filter(|block| block.lines().any(|l| l.starts_with("data:")))
        .collect()
}

/// The position block a new stream in channels starts with (`id: <position>` alone, PROTOCOL
/// §11.1), read before any event is published to it; returns the position.
async fn start_position(stream: &mut SseStream) -> String {
    let deadline = Instant::now() + SOON;
    while !stream.payload.windows(2).any(|w| w == b"\n\n") {
        assert!(
            Instant::now() < deadline,
            "no position block; payload {:?}",
            String::from_utf8_lossy(&stream.payload)
        );
        match stream.next_item(Duration::from_millis(20)).await {
            Ok(Item::Event(e)) => panic!("an event before the position block: {e:?}"),
            Ok(Item::Comment(_)) | Err(common::NoItem::Timeout) => {}
            Err(end) => panic!("stream ended: {end:?}"),
        }
    }
    let first = blocks(&stream.payload).remove(0);
    let id = first
        .strip_prefix("id: ")
        .and_then(|rest| rest.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("the first block is not `id: <position>` alone: {first:?}"));
    assert!(!id.is_empty() && !id.contains('\n'), "{first:?}");
    id.to_owned()
}

/// Publishes `data = n` for `n` from `from`, to `channels[n % len]`, over one keep-alive
/// connection, paced at `rate` per second (bursts catch up when it falls behind), until `limit`
/// events or [`Publisher::stop`].
struct Publisher {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<u64>,
}

impl Publisher {
    fn start(addr: SocketAddr, channels: &[&str], from: u64, rate: u64, limit: u64) -> Publisher {
        let count = Arc::new(AtomicU64::new(from));
        let stop = Arc::new(AtomicBool::new(false));
        let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
        let (c, s) = (count.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut conn = HttpConn::connect(addr).await;
            let start = Instant::now();
            let mut n = from;
            while n < from + limit && !s.load(Ordering::SeqCst) {
                let due = from + (start.elapsed().as_micros() as u64 * rate / 1_000_000).min(limit);
                while n < due {
                    let channel = &channels[n as usize % channels.len()];
                    let body = json!({"channel": channel, "event": {"data": n.to_string()}});
                    let r = conn.post_json("/internal/publish", &body).await;
                    assert_eq!(r.status(), 200, "publish {n}: {}", r.text());
                    n += 1;
                    c.store(n, Ordering::SeqCst);
                }
                // The publisher's pacing.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            n
        });
        Publisher { count, stop, task }
    }

    /// One past the last event published so far.
    fn published(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Stops and returns one past the last event published.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.join().await
    }

    async fn join(self) -> u64 {
        timeout(Duration::from_secs(30), self.task)
            .await
            .expect("publisher ended")
            .expect("publisher did not panic")
    }
}

/// A small deterministic generator for "arbitrary" points; the seed is printed on failure.
struct Rng(u64);

impl Rng {
    fn seeded() -> (Rng, u64) {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        (Rng(seed), seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test]
async fn a_stream_in_one_channel_resumes_exactly_with_the_very_frames_published() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    // Stays connected: its frames are the reference for what was published.
    let mut watcher = open(&gw, &mut backend, &["a"], None).await;
    let mut first = open(&gw, &mut backend, &["a"], None).await;
    for i in 0..3 {
        let event = json!({"name": "tick", "data": format!("{i}\nsecond line")});
        publish(&gw, json!({"channel": "a", "event": event})).await;
    }
    let mut ids = Vec::new();
    for i in 0..3 {
        let e = first.next_event(SOON).await;
        assert_eq!(
            (e.event.as_str(), e.data.clone()),
            ("tick", format!("{i}\nsecond line"))
        );
        ids.push(e.last_event_id);
    }
    assert!(ids.iter().all(|id| !id.is_empty()), "{ids:?}");
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");
    leave(&mut backend, first).await;
    for i in 3..5 {
        let event = json!({"name": "tick", "data": format!("{i}\nsecond line")});
        publish(&gw, json!({"channel": "a", "event": event})).await;
    }
    let watched = next_events(&mut watcher, 5).await;
    let mut again = open(&gw, &mut backend, &["a"], Some(&ids[2])).await;
    for want in &watched[3..] {
        assert_eq!(&again.next_event(SOON).await, want);
    }
    no_event_within(&mut again, QUIET).await;
    // Same bytes, same `id:`, as the frames a live stream got.
    assert_eq!(
        frames(&again.payload),
        frames(&watcher.payload)[3..],
        "{:?}",
        String::from_utf8_lossy(&watcher.payload)
    );
    publish_to(&gw, "a", "live").await;
    assert_eq!(again.next_event(SOON).await.data, "live");
    no_event_within(&mut again, QUIET).await;
    let m = gw.metrics().await;
    assert_eq!(resumes(&m), (1.0, 0.0));
}

#[tokio::test]
async fn a_stream_in_three_channels_resumes_exactly_in_publish_order() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    let channels = ["a", "b", "c"];
    let mut first = open(&gw, &mut backend, &channels, None).await;
    for (i, channel) in channels.iter().enumerate() {
        publish(
            &gw,
            json!({"channel": channel, "event": {"data": format!("{i}")}}),
        )
        .await;
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(first.next_event(SOON).await);
    }
    let position = seen[2].last_event_id.clone();
    assert!(!position.is_empty(), "published events carry an id");
    drop(first);
    assert_eq!(backend.next().await.action(), "disconnect");
    // Missed while away: one per channel, one to two channels at once, one elsewhere.
    publish(&gw, json!({"channel": "b", "event": {"data": "3"}})).await;
    publish(&gw, json!({"channels": ["a", "c"], "event": {"data": "4"}})).await;
    publish(&gw, json!({"channel": "other", "event": {"data": "x"}})).await;
    publish(&gw, json!({"channel": "c", "event": {"data": "5"}})).await;
    let mut again = resume_exactly(&gw, &mut backend, &channels, &position, &["3", "4", "5"]).await;
    publish(&gw, json!({"channel": "a", "event": {"data": "6"}})).await;
    assert_eq!(again.next_event(SOON).await.data, "6");
    let m = gw.metrics().await;
    assert_eq!(
        m.value("sse_gateway_resumes_total", &[("result", "complete")]),
        1.0
    );
}

/// Rule 2: a reader in `channels` that drops its connection at arbitrary points (FIN or RST, also
/// right after reconnecting) and comes back with its last id, while a publisher sends `0..N` at
/// 2000 events/s for 3 s: the reader gets exactly `0..N`, each once, in order.
async fn resume_while_publishing(channels: &[&str]) {
    const RATE: u64 = 2000;
    const TOTAL: u64 = 6000;
    let (mut rng, seed) = Rng::seeded();
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "10000").await;
    let mut stream = open(&gw, &mut backend, channels, None).await;
    let publisher = Publisher::start(gw.control_addr(), channels, 0, RATE, TOTAL);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = 0u64;
    let mut last_id = String::new();
    let mut reconnects = 0u64;
    let mut until_drop = 1 + rng.below(1000);
    while next < TOTAL {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: only {next} of {TOTAL} events after {reconnects} reconnects"
        );
        if until_drop == 0 {
            if rng.below(2) == 0 {
                stream.reset();
            } else {
                drop(stream);
            }
            stream = open(&gw, &mut backend, channels, Some(&last_id)).await;
            reconnects += 1;
            // One in four: drop again before reading anything.
            until_drop = if rng.below(4) == 0 {
                0
            } else {
                1 + rng.below(1000)
            };
            continue;
        }
        let e = stream.next_event(SOON).await;
        assert_eq!(
            (e.event.as_str(), e.data.as_str()),
            ("message", next.to_string().as_str()),
            "seed {seed}: after {reconnects} reconnects (last id {last_id:?}) expected {next}: {e:?}"
        );
        assert!(
            !e.last_event_id.is_empty() && e.last_event_id != last_id,
            "seed {seed}: every event has its own id: {e:?} after {last_id:?}"
        );
        last_id = e.last_event_id;
        next += 1;
        until_drop -= 1;
    }
    assert_eq!(publisher.join().await, TOTAL);
    no_event_within(&mut stream, QUIET).await;
    assert!(reconnects >= 3, "seed {seed}: only {reconnects} reconnects");
    eprintln!("seed {seed}: {TOTAL} events over {reconnects} reconnects");
    let m = gw.metrics().await;
    assert_eq!(
        resumes(&m),
        (reconnects as f64, 0.0),
        "seed {seed}: every reconnect resumed completely"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_while_publishing_2000_events_a_second_misses_nothing_and_repeats_nothing() {
    resume_while_publishing(&["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_while_publishing_to_three_channels_in_turn_misses_nothing_and_repeats_nothing() {
    resume_while_publishing(&["a", "b", "c"]).await;
}

#[tokio::test]
async fn an_unknown_position_gets_the_gap_event_first_then_live_events() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "2").await;
    let mut stream = open(&gw, &mut backend, &["a"], Some("nonsense")).await;
    let gap = stream.next_event(SOON).await;
    assert_eq!(gap.event, "gateway.gap");
    assert_eq!(
        serde_json::from_str::<Value>(&gap.data).unwrap(),
        json!({"last_event_id": "nonsense"})
    );
    publish(&gw, json!({"channel": "a", "event": {"data": "live"}})).await;
    let live = stream.next_event(SOON).await;
    assert_eq!(live.data, "live");
    let m = gw.metrics().await;
    assert_eq!(
        m.value("sse_gateway_resumes_total", &[("result", "gap")]),
        1.0
    );
}

#[tokio::test]
async fn a_position_older_than_what_is_kept_is_a_gap_and_the_gaps_id_resumes_exactly() {
    let (mut backend, gw, mut watcher, position) = a_page_older_than_what_is_kept().await;
    assert_eq!(
        data_of_next(&mut watcher, 6).await,
        ["0", "1", "2", "3", "4", "5"]
    );
    // The gap's id is opaque; that it names the current position shows below: a resume from it
    // gets exactly what was published after it (from any earlier position, HISTORY_SIZE=2 has
    // dropped something: a gap again). Nothing of the kept events follows the gap: they are
    // before its id.
    let (mut again, gap_id) = resume_to_a_gap(&gw, &mut backend, &["a"], &position).await;
    publish_to(&gw, "a", "6").await;
    assert_eq!(again.next_event(SOON).await.data, "6");
    leave(&mut backend, again).await;
    publish_to(&gw, "a", "7").await;
    // From the gap's id: the two events after it, once each.
    let _resumed = resume_exactly(&gw, &mut backend, &["a"], &gap_id, &["6", "7"]).await;
    let m = gw.metrics().await;
    assert_eq!(resumes(&m), (1.0, 1.0));
}

#[tokio::test]
async fn a_drop_in_any_one_of_the_streams_channels_is_a_gap() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "2").await;
    let position = position_before_leaving(&gw, &mut backend, &["a", "b"], "0").await;
    // `b` keeps all it got since; `a` dropped "a1".
    publish_to(&gw, "b", "b1").await;
    for i in 1..=3 {
        publish_to(&gw, "a", &format!("a{i}")).await;
    }
    let _again = resume_to_a_gap(&gw, &mut backend, &["a", "b"], &position).await;
    // Without `a`, nothing was dropped: exact.
    let _only_b = resume_exactly(&gw, &mut backend, &["b"], &position, &["b1"]).await;
    assert_eq!(resumes(&gw.metrics().await), (1.0, 1.0));
}

#[tokio::test]
async fn a_position_ahead_of_the_history_is_a_gap() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    let (_first, position) = open_and_take_position(&gw, &mut backend, &["a"], "0").await;
    // PROTOCOL §11.1's `<epoch>-<seq>-<ms>`, with a seq not handed out yet.
    let parts: Vec<&str> = position.split('-').collect();
    assert_eq!(parts.len(), 3, "{position}");
    let seq: u64 = parts[1].parse().expect("seq");
    let ahead = format!("{}-{}-{}", parts[0], seq + 3, parts[2]);
    let mut again = open(&gw, &mut backend, &["a"], Some(&ahead)).await;
    let gap_id = expect_gap(&mut again, &ahead).await;
    // Had it been taken, the next three publishes would be skipped by a later resume.
    for i in 1..=3 {
        publish_to(&gw, "a", &i.to_string()).await;
    }
    assert_eq!(data_of_next(&mut again, 3).await, ["1", "2", "3"]);
    leave(&mut backend, again).await;
    let _resumed = resume_exactly(&gw, &mut backend, &["a"], &gap_id, &["1", "2", "3"]).await;
    assert_eq!(resumes(&gw.metrics().await), (1.0, 1.0));
}

#[tokio::test]
async fn the_gap_comes_first_also_when_events_are_published_during_the_connect_callback() {
    let (mut backend, gw, mut watcher, position) = a_page_older_than_what_is_kept().await;
    let opening =
        open_with_slow_connect(&gw, &mut backend, &position, Duration::from_millis(500)).await;
    for d in ["d1", "d2", "d3"] {
        publish_to(&gw, "a", d).await;
    }
    assert!(
        !opening.is_finished(),
        "the connect callback was still in flight during the publishes"
    );
    let mut again = timeout(SOON, opening).await.expect("opened").unwrap();
    let watched = next_events(&mut watcher, 9).await;
    let data: Vec<&str> = watched.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["0", "1", "2", "3", "4", "5", "d1", "d2", "d3"]);
    let gap_id = expect_gap(&mut again, &position).await;
    publish_to(&gw, "a", "after1").await;
    assert_eq!(
        again.next_event(SOON).await.data,
        "after1",
        "nothing published during the callback follows the gap"
    );
    leave(&mut backend, again).await;
    publish_to(&gw, "a", "after2").await;
    let want = ["after1", "after2"];
    let _resumed = resume_exactly(&gw, &mut backend, &["a"], &gap_id, &want).await;
    let m = gw.metrics().await;
    assert_eq!(resumes(&m), (1.0, 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_during_the_connect_callback_arrive_once_in_order_after_the_missed_ones() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "10000").await;
    let mut first = open(&gw, &mut backend, &["a"], None).await;
    for i in 0..3 {
        publish_to(&gw, "a", &i.to_string()).await;
    }
    let seen = next_events(&mut first, 3).await;
    let data: Vec<&str> = seen.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["0", "1", "2"]);
    let position = seen[2].last_event_id.clone();
    leave(&mut backend, first).await;
    for i in 3..6 {
        publish_to(&gw, "a", &i.to_string()).await;
    }
    let opening =
        open_with_slow_connect(&gw, &mut backend, &position, Duration::from_millis(300)).await;
    // From the callback's arrival until well after the stream is open, one event per ms or so:
    // some before the join, maybe some between the join and the replay, the rest live.
    let publisher = Publisher::start(gw.control_addr(), &["a"], 6, 1000, 100_000);
    let mut again = timeout(SOON, opening).await.expect("opened").unwrap();
    let during = publisher.published();
    assert!(
        during > 6 + 10,
        "events were published during the connect callback: {during}"
    );
    let mut next = 3u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while next < during + 100 {
        assert!(Instant::now() < deadline, "only {next} events");
        assert_eq!(again.next_event(SOON).await.data, next.to_string());
        next += 1;
    }
    let total = publisher.stop().await;
    while next < total {
        assert_eq!(again.next_event(SOON).await.data, next.to_string());
        next += 1;
    }
    no_event_within(&mut again, QUIET).await;
    let m = gw.metrics().await;
    assert_eq!(resumes(&m), (1.0, 0.0));
}

#[tokio::test]
async fn events_expired_by_the_ttl_are_a_gap() {
    let mut backend = Backend::start().await;
    let gw = history_gateway_with(&backend, "100", &[("HISTORY_TTL_SECONDS", "1")]).await;
    let position = position_before_leaving(&gw, &mut backend, &["a"], "0").await;
    publish_to(&gw, "a", "1").await;
    publish_to(&gw, "a", "2").await;
    let m = gw.metrics().await;
    assert!(
        m.value("sse_gateway_history_bytes", &[]) > 0.0,
        "events are kept: {}",
        m.text
    );
    gw.wait_metrics(SOON, |m| {
        m.get("sse_gateway_history_bytes", &[]) == Some(0.0)
    })
    .await;
    let (mut again, gap_id) = resume_to_a_gap(&gw, &mut backend, &["a"], &position).await;
    publish_to(&gw, "a", "3").await;
    let live = again.next_event(SOON).await;
    assert_eq!(live.data, "3");
    assert_ne!(live.last_event_id, gap_id);
    let m = gw.metrics().await;
    assert_eq!(resumes(&m), (0.0, 1.0));
}

#[tokio::test]
async fn a_recent_position_in_a_channel_that_kept_nothing_resumes_completely_with_nothing() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    let (_first, position) = open_and_take_position(&gw, &mut backend, &["a"], "0").await;
    // A page whose connect now names a channel nobody ever published to.
    let mut other = resume_exactly(&gw, &mut backend, &["never"], &position, &[]).await;
    publish_to(&gw, "never", "first").await;
    assert_eq!(other.next_event(SOON).await.data, "first");
    let m = gw.metrics().await;
    assert_eq!(resumes(&m), (1.0, 0.0));
}

/// What one kilobyte event of channel `c<i>` holds.
fn kilobyte(i: usize) -> String {
    format!("{i:05}:{}", "x".repeat(1018))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_max_bytes_holds_under_ten_thousand_channels() {
    const MAX: f64 = 1_048_576.0;
    let mut backend = Backend::start().await;
    let gw = history_gateway_with(
        &backend,
        "100",
        &[
            ("HISTORY_MAX_BYTES", "1048576"),
            ("MAX_SEND_BYTES", "4194304"),
        ],
    )
    .await;
    let (mut probe, before) = open_and_take_position(&gw, &mut backend, &["probe"], "before").await;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, addr) = (stop.clone(), gw.control_addr());
        tokio::spawn(async move {
            let (mut max, mut samples) = (0.0f64, 0u32);
            while !stop.load(Ordering::SeqCst) {
                let m = Metrics::parse(&get(addr, "/metrics").await.text());
                max = max.max(m.value("sse_gateway_history_bytes", &[]));
                samples += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (max, samples)
        })
    };
    for b in 0..10 {
        let items: Vec<Value> = (b * 1000..(b + 1) * 1000)
            .map(|i| {
                json!({"op": "publish", "channel": format!("c{i}"), "event": {"data": kilobyte(i)}})
            })
            .collect();
        let r = gw
            .post("/internal/batch", &json!({ "requests": items }))
            .await;
        assert_eq!(r.status(), 200, "{}", r.text());
        let results = r.json()["results"].as_array().unwrap().clone();
        assert_eq!(results.len(), 1000);
        for result in &results {
            assert_eq!(
                result,
                &json!({"status": 200, "body": {"status": "ok", "delivered": 0}})
            );
        }
        let bytes = gw.metrics().await.value("sse_gateway_history_bytes", &[]);
        assert!(bytes <= MAX, "after batch {b}: {bytes} > {MAX}");
    }
    stop.store(true, Ordering::SeqCst);
    let (max, samples) = timeout(SOON, sampler).await.unwrap().unwrap();
    assert!(samples >= 2, "{samples} samples");
    assert!(max <= MAX, "sampled {max} > {MAX}");
    let bytes = gw.metrics().await.value("sse_gateway_history_bytes", &[]);
    assert!(
        (0.9 * MAX..=MAX).contains(&bytes),
        "near the bound at the end: {bytes}"
    );
    publish_to(&gw, "probe", "after").await;
    let after = probe.next_event(SOON).await.last_event_id;

    // The newest channel is kept: exact resume from before all of them.
    let newest_data = kilobyte(9999);
    let _newest = resume_exactly(&gw, &mut backend, &["c9999"], &before, &[&newest_data]).await;
    // The oldest was forgotten by the byte bound: a gap.
    let _oldest = resume_to_a_gap(&gw, &mut backend, &["c0"], &before).await;
    // From a position after everything the bound forgot, nothing is missing.
    let _later = resume_exactly(&gw, &mut backend, &["c0"], &after, &[]).await;
    let m = gw.metrics().await;
    assert_eq!(resumes(&m), (2.0, 1.0));
}

#[tokio::test]
async fn history_settings_take_their_bounds_and_nothing_past_them() {
    let base = || Gateway::builder().env("CALLBACK_URL", "http://127.0.0.1:9/cb");
    for (var, value) in [
        ("HISTORY_MAX_BYTES", "4096"),
        ("HISTORY_SIZE", "10000"),
        ("HISTORY_TTL_SECONDS", "86400"),
        ("HISTORY_TTL_SECONDS", "1"),
    ] {
        let gw = base()
            .env("HISTORY_SIZE", "1")
            .env(var, value)
            .spawn()
            .await;
        let m = gw.metrics().await;
        assert_eq!(
            m.get("sse_gateway_history_bytes", &[]),
            Some(0.0),
            "{var}={value}"
        );
    }
    let mut failures = Vec::new();
    for (var, value) in [
        ("HISTORY_MAX_BYTES", "4095"),
        ("HISTORY_SIZE", "10001"),
        ("HISTORY_SIZE", "-1"),
        ("HISTORY_TTL_SECONDS", "0"),
        ("HISTORY_TTL_SECONDS", "86401"),
    ] {
        let builder = base().env("HISTORY_SIZE", "1");
        failures.extend(builder.refusal_problem(var, value).await);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn the_reconnects_connect_answer_decides_what_is_replayed() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    let position = position_before_leaving(&gw, &mut backend, &["a", "secret"], "0").await;
    publish_to(&gw, "secret", "s1").await;
    publish_to(&gw, "a", "a1").await;
    publish(
        &gw,
        json!({"channels": ["secret", "a"], "event": {"data": "both"}}),
    )
    .await;
    publish_to(&gw, "secret", "s2").await;
    // The backend took `secret` away.
    let mut again = resume_exactly(&gw, &mut backend, &["a"], &position, &["a1", "both"]).await;
    assert_eq!(publish_to(&gw, "secret", "s3").await, 0);
    publish_to(&gw, "a", "a2").await;
    assert_eq!(again.next_event(SOON).await.data, "a2");
    let m = gw.metrics().await;
    assert_eq!(resumes(&m), (1.0, 0.0));
}

fn id_refused() -> Value {
    json!({"error": "Invalid request: event.id is not allowed in a publish while history is on (HISTORY_SIZE > 0): the gateway assigns every published event's id"})
}

#[tokio::test]
async fn with_history_on_a_publish_may_not_bring_its_own_id_alone_or_in_a_batch() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    let mut stream = open(&gw, &mut backend, &["a"], None).await;
    let r = gw
        .post(
            "/internal/publish",
            &json!({"channel": "a", "event": {"data": "x", "id": "mine"}}),
        )
        .await;
    r.assert_json(400, id_refused());
    let r = gw
        .post(
            "/internal/batch",
            &json!({"requests": [
                {"op": "publish", "channel": "a", "event": {"data": "1"}},
                {"op": "publish", "channel": "a", "event": {"data": "2", "id": "mine"}},
                {"op": "publish", "channel": "a", "event": {"data": "3"}},
            ]}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"results": [
            {"status": 200, "body": {"status": "ok", "delivered": 1}},
            {"status": 400, "body": id_refused()},
            {"status": 200, "body": {"status": "ok", "delivered": 1}},
        ]})
    );
    let one = stream.next_event(SOON).await;
    let three = stream.next_event(SOON).await;
    assert_eq!((one.data.as_str(), three.data.as_str()), ("1", "3"));
    for e in [&one, &three] {
        assert!(
            !e.last_event_id.is_empty() && e.last_event_id != "mine",
            "{e:?}"
        );
    }
    no_event_within(&mut stream, QUIET).await;
}

#[tokio::test]
async fn with_history_off_a_publishs_own_id_is_delivered_as_given() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut stream = open(&gw, &mut backend, &["a"], None).await;
    publish(
        &gw,
        json!({"channel": "a", "event": {"data": "x", "id": "mine-7"}}),
    )
    .await;
    let e = stream.next_event(SOON).await;
    assert_eq!((e.data.as_str(), e.last_event_id.as_str()), ("x", "mine-7"));
    assert_eq!(blocks(&stream.payload), ["id: mine-7\ndata: x\n\n"]);
}

#[tokio::test]
async fn with_history_off_last_event_id_only_reaches_the_backend() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut first = open(&gw, &mut backend, &["a"], None).await;
    publish_to(&gw, "a", "0").await;
    assert_eq!(first.next_event(SOON).await.data, "0");
    leave(&mut backend, first).await;
    publish_to(&gw, "a", "missed").await;
    for last in ["nonsense", "0000abcd-1-1700000000000"] {
        let headers: Vec<(&str, &[u8])> = vec![("Last-Event-ID", last.as_bytes())];
        let (mut stream, connect) = open_at(&gw, &mut backend, "/s", &["a"], &headers).await;
        assert_eq!(
            connect.body["request"]["headers"]["last-event-id"],
            json!(last),
            "{:?}",
            connect.body
        );
        // No gap, no replay.
        no_event_within(&mut stream, QUIET).await;
        publish(
            &gw,
            json!({"channel": "a", "event": {"name": "n", "data": "live"}}),
        )
        .await;
        let e = stream.next_event(SOON).await;
        assert_eq!((e.event.as_str(), e.data.as_str()), ("n", "live"));
        assert_eq!(e.last_event_id, "");
        // The frame exactly as sent, and nothing else: no `id:` line, no position block.
        assert_eq!(blocks(&stream.payload), ["event: n\ndata: live\n\n"]);
        leave(&mut backend, stream).await;
    }
    let m = gw.metrics().await;
    assert_eq!(
        m.get("sse_gateway_resumes_total", &[("result", "complete")]),
        Some(0.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.get("sse_gateway_resumes_total", &[("result", "gap")]),
        Some(0.0)
    );
    assert_eq!(m.get("sse_gateway_history_bytes", &[]), Some(0.0));
}

#[tokio::test]
async fn the_last_event_id_query_parameter_resumes_and_the_header_wins_over_it() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    let position = position_before_leaving(&gw, &mut backend, &["a"], "0").await;
    publish_to(&gw, "a", "1").await;
    assert!(position.contains('-'), "{position}");
    let encoded = position.replace('-', "%2D");
    let target = format!("/s?page=1&last_event_id={encoded}");
    let (mut by_query, connect) = open_at(&gw, &mut backend, &target, &["a"], &[]).await;
    assert_eq!(connect.url(), target);
    assert_eq!(by_query.next_event(SOON).await.data, "1");
    no_event_within(&mut by_query, QUIET).await;
    assert_eq!(resumes(&gw.metrics().await), (1.0, 0.0));

    // The header wins: a good header with a bad query resumes...
    let target = "/s?last_event_id=garbage";
    let header: Vec<(&str, &[u8])> = vec![("Last-Event-ID", position.as_bytes())];
    let (mut good_header, _) = open_at(&gw, &mut backend, target, &["a"], &header).await;
    assert_eq!(good_header.next_event(SOON).await.data, "1");
    no_event_within(&mut good_header, QUIET).await;
    assert_eq!(resumes(&gw.metrics().await), (2.0, 0.0));
    // ...a bad header with a good query is a gap for the header's value, even an empty one.
    let target = format!("/s?last_event_id={encoded}");
    for bad in ["garbage", ""] {
        let header: Vec<(&str, &[u8])> = vec![("Last-Event-ID", bad.as_bytes())];
        let (mut stream, _) = open_at(&gw, &mut backend, &target, &["a"], &header).await;
        expect_gap(&mut stream, bad).await;
        no_event_within(&mut stream, QUIET).await;
    }
    assert_eq!(resumes(&gw.metrics().await), (2.0, 2.0));
}

#[tokio::test]
async fn per_token_sends_keep_the_position_without_an_id_and_make_a_gap_with_one() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    let (mut first, token) = open_token(&gw, &mut backend, &["a"], None).await;
    publish_to(&gw, "a", "0").await;
    let position = first.next_event(SOON).await.last_event_id;
    gw.send_ok(&json!({"token": token, "event": {"data": "private"}}))
        .await;
    let private = first.next_event(SOON).await;
    assert_eq!(private.data, "private");
    assert_eq!(
        private.last_event_id, position,
        "a send without id keeps the position"
    );
    assert_eq!(
        frames(&first.payload).last().map(String::as_str),
        Some("data: private\n\n"),
        "the send's frame carries no id"
    );
    leave(&mut backend, first).await;
    publish_to(&gw, "a", "1").await;
    let headers: Vec<(&str, &[u8])> = vec![("Last-Event-ID", private.last_event_id.as_bytes())];
    let (mut second, connect) = open_at(&gw, &mut backend, "/s", &["a"], &headers).await;
    assert_eq!(
        connect.body["request"]["headers"]["last-event-id"],
        json!(position),
        "with history on the header still reaches the backend"
    );
    assert_eq!(second.next_event(SOON).await.data, "1");
    no_event_within(&mut second, QUIET).await;

    let token = connect.token().to_owned();
    gw.send_ok(&json!({"token": token, "event": {"data": "with id", "id": "x"}}))
        .await;
    let with_id = second.next_event(SOON).await;
    assert_eq!(
        (with_id.data.as_str(), with_id.last_event_id.as_str()),
        ("with id", "x")
    );
    leave(&mut backend, second).await;
    publish_to(&gw, "a", "2").await;
    let (mut third, connect) = open_at(
        &gw,
        &mut backend,
        "/s",
        &["a"],
        &[("Last-Event-ID", b"x".as_slice())],
    )
    .await;
    assert_eq!(
        connect.body["request"]["headers"]["last-event-id"],
        json!("x")
    );
    // Never a silent skip of "2": the page learns it must reload.
    let gap_id = expect_gap(&mut third, "x").await;
    no_event_within(&mut third, QUIET).await;
    leave(&mut backend, third).await;
    publish_to(&gw, "a", "3").await;
    let _fourth = resume_exactly(&gw, &mut backend, &["a"], &gap_id, &["3"]).await;
    assert_eq!(resumes(&gw.metrics().await), (2.0, 1.0));
}

#[tokio::test]
async fn a_new_stream_in_channels_starts_with_its_position_and_resumes_from_it_before_any_event() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    publish_to(&gw, "a", "old").await;
    let mut first = open(&gw, &mut backend, &["a"], None).await;
    let position = start_position(&mut first).await;
    // Dropped before its first event: the page comes back with the block's id.
    leave(&mut backend, first).await;
    publish_to(&gw, "a", "1").await;
    publish_to(&gw, "b", "elsewhere").await;
    publish_to(&gw, "a", "2").await;
    let again = resume_exactly(&gw, &mut backend, &["a"], &position, &["1", "2"]).await;
    // A resumed stream gets no position block of its own: it starts with the replay.
    assert!(
        String::from_utf8_lossy(&again.payload).starts_with("id: ")
            && frames(&again.payload).len() == blocks(&again.payload).len(),
        "{:?}",
        String::from_utf8_lossy(&again.payload)
    );
    // The block dispatches no event; its position is the current one: a page dropped before
    // its first event resumes from there, without what it had before the block.
    let mut second = open(&gw, &mut backend, &["a"], None).await;
    let next = start_position(&mut second).await;
    no_event_within(&mut second, QUIET).await;
    leave(&mut backend, second).await;
    publish_to(&gw, "a", "3").await;
    let _third = resume_exactly(&gw, &mut backend, &["a"], &next, &["3"]).await;
    assert_eq!(resumes(&gw.metrics().await), (2.0, 0.0));
}

fn empty_id_refused() -> Value {
    json!({"error": "Invalid request: event.id must not be empty while history is on (HISTORY_SIZE > 0): it would make the page forget its position and lose channel events on its next reconnect"})
}

#[tokio::test]
async fn with_history_on_a_send_with_an_empty_id_is_refused_alone_or_in_a_batch() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    let (mut stream, token) = open_token(&gw, &mut backend, &["a"], None).await;
    let position = start_position(&mut stream).await;
    let r = gw
        .send(&json!({"token": token, "event": {"data": "x", "id": ""}}))
        .await;
    r.assert_json(400, empty_id_refused());
    let r = gw
        .post(
            "/internal/batch",
            &json!({"requests": [
                {"op": "send", "token": token, "event": {"data": "1"}},
                {"op": "send", "token": token, "event": {"data": "2", "id": ""}},
                {"op": "send", "token": token, "event": {"data": "3"}},
            ]}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"results": [
            {"status": 200, "body": {"status": "ok"}},
            {"status": 400, "body": empty_id_refused()},
            {"status": 200, "body": {"status": "ok"}},
        ]})
    );
    let got = next_events(&mut stream, 2).await;
    for (e, want) in got.iter().zip(["1", "3"]) {
        assert_eq!(
            (e.data.as_str(), e.last_event_id.as_str()),
            (want, position.as_str())
        );
    }
    no_event_within(&mut stream, QUIET).await;

    // With history off an empty id is the backend's business, as before.
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let (mut stream, token) = open_token(&gw, &mut backend, &["a"], None).await;
    gw.send_ok(&json!({"token": token, "event": {"data": "x", "id": ""}}))
        .await;
    assert_eq!(stream.next_event(SOON).await.data, "x");
}

/// A new stream (no position) opening while its channel is published to: a publish that counted
/// the stream in its `delivered` reaches it. Many attempts, each in its own channel (and in 999
/// quiet ones), since the window between the join and the position block is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_counts_a_new_stream_reaches_it() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    let current = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // (n, attempt, delivered) of every publish.
    let publisher = {
        let (current, stop, addr) = (current.clone(), stop.clone(), gw.control_addr());
        tokio::spawn(async move {
            let mut conn = HttpConn::connect(addr).await;
            let mut log = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && n < 200_000 {
                let attempt = current.load(Ordering::SeqCst);
                let body =
                    json!({"channel": format!("c{attempt}"), "event": {"data": n.to_string()}});
                let r = conn.post_json("/internal/publish", &body).await;
                assert_eq!(r.status(), 200, "{}", r.text());
                log.push((n, attempt, r.json()["delivered"].as_u64().unwrap()));
                n += 1;
            }
            log
        })
    };
    let pads: Vec<String> = (0..999).map(|i| format!("pad-{i}")).collect();
    let mut first_seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    for attempt in 0..1000u64 {
        if Instant::now() > deadline {
            break;
        }
        current.store(attempt, Ordering::SeqCst);
        let channel = format!("c{attempt}");
        // Joined first; the other channels (no publishes) make the join, and so the window,
        // longer.
        let names: Vec<&str> = std::iter::once(channel.as_str())
            .chain(pads.iter().map(String::as_str))
            .collect();
        let mut stream = open(&gw, &mut backend, &names, None).await;
        let event = stream.next_event(SOON).await;
        let first: u64 = event.data.parse().unwrap_or_else(|_| panic!("{event:?}"));
        first_seen.push(first);
    }
    stop.store(true, Ordering::SeqCst);
    let log = timeout(SOON, publisher).await.unwrap().unwrap();
    assert!(first_seen.len() >= 20, "{} attempts", first_seen.len());
    let lost: Vec<_> = log
        .iter()
        .filter(|(n, attempt, delivered)| {
            *delivered > 0
                && first_seen
                    .get(*attempt as usize)
                    .is_some_and(|first| n < first)
        })
        .collect();
    assert!(
        lost.is_empty(),
        "of {} new streams, these publishes answered delivered >= 1 to the stream alone in their \
         channel, which never got them (its first event came later) (n, attempt, delivered): {lost:?}",
        first_seen.len()
    );
}

#[tokio::test]
async fn a_stream_whose_connect_names_no_channel_ignores_its_position() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    publish_to(&gw, "a", "before").await;
    for answer in ["", "{}", r#"{"channels":[]}"#] {
        for last in [Some("nonsense"), None] {
            backend.on_connect(Reply::ok().body(answer));
            let headers = last_event_id_header(last);
            let mut stream = open_stream_with(gw.addr, "/s", &headers, None)
                .await
                .unwrap_or_else(|r| panic!("refused: {} {}", r.status(), r.text()));
            let token = next_connect(&mut backend).await.token().to_owned();
            no_event_within(&mut stream, QUIET).await;
            // No gap, no replay, and no position block either.
            assert_eq!(
                blocks(&stream.payload),
                Vec::<String>::new(),
                "{answer:?} {last:?}"
            );
            // The stream itself works: a later subscribe brings live events, nothing replayed.
            let r = gw
                .post(
                    "/internal/subscribe",
                    &json!({"token": token, "channels": ["a"]}),
                )
                .await;
            r.assert_json(200, json!({"status": "ok"}));
            publish_to(&gw, "a", "live").await;
            let e = stream.next_event(SOON).await;
            assert_eq!(
                (e.event.as_str(), e.data.as_str()),
                ("message", "live"),
                "{answer:?} {last:?}"
            );
            no_event_within(&mut stream, QUIET).await;
            leave(&mut backend, stream).await;
        }
    }
    assert_eq!(resumes(&gw.metrics().await), (0.0, 0.0));
}

#[tokio::test]
async fn a_position_from_before_a_restart_is_a_gap() {
    let mut backend = Backend::start().await;
    let earlier = history_gateway(&backend, "100").await;
    let (first, position) = open_and_take_position(&earlier, &mut backend, &["a"], "old").await;
    drop(first);
    // Killed: its streams are gone without callbacks, its history with it.
    drop(earlier);

    let gw = history_gateway(&backend, "100").await;
    // The new life's counter passes the old position: only the epoch tells them apart.
    for i in 0..3 {
        publish_to(&gw, "a", &format!("new{i}")).await;
    }
    let (mut again, _) = resume_to_a_gap(&gw, &mut backend, &["a"], &position).await;
    publish_to(&gw, "a", "live").await;
    assert_eq!(again.next_event(SOON).await.data, "live");
    assert_eq!(resumes(&gw.metrics().await), (0.0, 1.0));
}

#[tokio::test]
async fn a_replay_larger_than_the_queue_bound_is_a_gap_not_an_overflow() {
    let mut backend = Backend::start().await;
    let gw = history_gateway_with(&backend, "100", &[("MAX_QUEUE_BYTES", "16384")]).await;
    let big = |i: usize| format!("{i}:{}", "y".repeat(4000));
    let position = position_before_leaving(&gw, &mut backend, &["a"], "0").await;
    // About 12 KB missed: fits, an exact resume.
    for i in 1..=3 {
        publish_to(&gw, "a", &big(i)).await;
    }
    let mut fits = open(&gw, &mut backend, &["a"], Some(&position)).await;
    assert_eq!(data_of_next(&mut fits, 3).await, [big(1), big(2), big(3)]);
    let through = common::sse::events(&fits.payload)
        .pop()
        .unwrap()
        .last_event_id;
    leave(&mut backend, fits).await;
    // About 24 KB more: cannot be queued at once.
    for i in 4..=9 {
        publish_to(&gw, "a", &big(i)).await;
    }
    let (mut too_much, gap_id) = resume_to_a_gap(&gw, &mut backend, &["a"], &through).await;
    publish_to(&gw, "a", "live").await;
    assert_eq!(too_much.next_event(SOON).await.data, "live");
    assert_eq!(too_much.ended(), None, "the stream stays open");
    backend.expect_none(QUIET).await;
    let m = gw.metrics().await;
    assert_eq!(
        m.value("sse_gateway_disconnects_total", &[("reason", "error")]),
        0.0
    );
    assert_eq!(resumes(&m), (1.0, 1.0));
    // The gap's id resumes what followed it.
    leave(&mut backend, too_much).await;
    let _after = resume_exactly(&gw, &mut backend, &["a"], &gap_id, &["live"]).await;
}

/// A stream resuming while publishes with `close: true` reach its channel: whichever comes first,
/// the stream never starts with a live event in place of what it missed (the page would reconnect
/// after that event's id and never see the replay). Many attempts, since the window between the
/// stream's join and its replay is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_publish_racing_a_resume_never_makes_the_stream_skip_its_replay() {
    const PRE: usize = 2000;
    const MAX_CLOSES: u64 = 7000;
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "10000").await;
    let position = position_before_leaving(&gw, &mut backend, &["a"], "p0").await;
    // A replay of some length: its snapshot and merge take a moment.
    for b in 0..PRE / 1000 {
        let items: Vec<Value> = (b * 1000..(b + 1) * 1000)
            .map(
                |i| json!({"op": "publish", "channel": "a", "event": {"data": format!("pre-{i}")}}),
            )
            .collect();
        let r = gw
            .post("/internal/batch", &json!({ "requests": items }))
            .await;
        assert_eq!(r.status(), 200, "{}", r.text());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let closer = {
        let (stop, addr) = (stop.clone(), gw.control_addr());
        tokio::spawn(async move {
            let mut conn = HttpConn::connect(addr).await;
            let mut n = 0u64;
            // Fewer than HISTORY_SIZE - PRE - 1: the position stays resumable.
            while !stop.load(Ordering::SeqCst) && n < MAX_CLOSES {
                let body =
                    json!({"channel": "a", "event": {"data": format!("close-{n}")}, "close": true});
                let r = conn.post_json("/internal/publish", &body).await;
                assert_eq!(r.status(), 200, "{}", r.text());
                n += 1;
            }
            n
        })
    };
    let mut skipped = Vec::new();
    let mut attempts = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while attempts < 300 && Instant::now() < deadline && !closer.is_finished() {
        attempts += 1;
        let mut stream = open(&gw, &mut backend, &["a"], Some(&position)).await;
        let e = stream.next_event(SOON).await;
        if e.data != "pre-0" {
            skipped.push((attempts, e.data));
        }
    }
    stop.store(true, Ordering::SeqCst);
    let closes = timeout(SOON, closer).await.unwrap().unwrap();
    assert!(
        closes > 0 && attempts >= 20,
        "{closes} closes, {attempts} attempts"
    );
    assert!(
        skipped.is_empty(),
        "of {attempts} resumes from before pre-0 (with {closes} closing publishes racing them), \
         these started with a live event instead of the replay (attempt, first event): {skipped:?}"
    );
}
