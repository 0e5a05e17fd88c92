//! PROTOCOL §11: Last-Event-ID resume from channel history on one node. Real gateway binary, backend
//! double answering channel lists, independent SSE parser (its `last_event_id` is what a browser's
//! `EventSource` would send back on reconnect).

mod common;

use std::time::Duration;

use common::http::open_stream_with;
use common::{Backend, Gateway, Item, Reply, SseStream, SOON};
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_millis(300);

async fn history_gateway(backend: &Backend, size: &str) -> Gateway {
    Gateway::builder()
        .callback(backend)
        .env("HISTORY_SIZE", size)
        .spawn()
        .await
}

async fn publish(gw: &Gateway, body: Value) -> u64 {
    let r = gw.post("/internal/publish", &body).await;
    assert_eq!(r.status(), 200, "publish {body}: {}", r.text());
    r.json()["delivered"].as_u64().expect("delivered")
}

/// Opens a stream the backend puts in `channels`, coming back with `last_event_id` (if any) in
/// the `Last-Event-ID` header.
async fn open(
    gw: &Gateway,
    backend: &mut Backend,
    channels: &[&str],
    last_event_id: Option<&str>,
) -> SseStream {
    backend.on_connect(Reply::ok().body(json!({ "channels": channels }).to_string()));
    let headers: Vec<(&str, &[u8])> = last_event_id
        .map(|id| vec![("Last-Event-ID", id.as_bytes())])
        .unwrap_or_default();
    let stream = open_stream_with(gw.addr, "/s", &headers, None)
        .await
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status(), r.text()));
    backend.next_connect().await;
    stream
}

async fn no_event_within(stream: &mut SseStream, quiet: Duration) {
    loop {
        match stream.next_item(quiet).await {
            Ok(Item::Comment(_)) => continue,
            Ok(Item::Event(e)) => panic!("unexpected event {e:?}"),
            Err(_) => return,
        }
    }
}

#[tokio::test]
async fn a_stream_in_three_channels_resumes_exactly_in_publish_order() {
    let mut backend = Backend::start().await;
    let gw = history_gateway(&backend, "100").await;
    let channels = ["a", "b", "c"];
    let mut first = open(&gw, &mut backend, &channels, None).await;
    for i in 0..3 {
        publish(
            &gw,
            json!({"channel": channels[i], "event": {"data": format!("{i}")}}),
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
    let mut again = open(&gw, &mut backend, &channels, Some(&position)).await;
    for want in ["3", "4", "5"] {
        assert_eq!(again.next_event(SOON).await.data, want);
    }
    no_event_within(&mut again, QUIET).await;
    publish(&gw, json!({"channel": "a", "event": {"data": "6"}})).await;
    assert_eq!(again.next_event(SOON).await.data, "6");
    let m = gw.metrics().await;
    assert_eq!(
        m.value("sse_gateway_resumes_total", &[("result", "complete")]),
        1.0
    );
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
