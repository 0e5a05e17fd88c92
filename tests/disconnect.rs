//! PROTOCOL §5: disconnect callbacks — payload, reasons, exactly once per accepted token across
//! client close, reset, server close and failing callbacks; none for refused tokens (see
//! connect.rs); a burst over reused backend connections. Overflow is in send.rs, shutdown in
//! operations.rs.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::http::open_stream;
use common::{Backend, End, Gateway, Reply, SOON};
use serde_json::json;
use tokio::task::JoinSet;

const QUIET: Duration = Duration::from_millis(500);

#[tokio::test]
async fn client_close_gives_one_client_closed_with_the_connect_request() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let stream = common::http::open_stream_with(
        gw.addr,
        "/bye?who=me",
        &[("Cookie", b"s=1"), ("X-Trace", b"abc")],
        None,
    )
    .await
    .unwrap_or_else(|r| panic!("{}", r.status()));
    let connect = backend.next_connect().await;
    drop(stream);
    let cb = backend
        .next_disconnect(connect.token(), "client_closed")
        .await;
    assert_eq!(cb.method, "POST");
    assert_eq!(cb.path, Backend::PATH);
    let ct = cb.content_type.clone().unwrap_or_default();
    assert!(ct.starts_with("application/json"), "{ct:?}");
    let keys: HashSet<&str> = cb
        .body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        HashSet::from(["action", "reason", "token", "request"])
    );
    assert_eq!(
        cb.body["request"], connect.body["request"],
        "same request as connect"
    );
    backend.expect_none(QUIET).await;
    gw.send(&json!({"token": connect.token(), "event": {"data": "x"}}))
        .await
        .assert_json(404, json!({"error": "Token not found"}));
    backend.expect_none(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn client_reset_gives_one_client_closed() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let (stream, token) = gw.open(&mut backend, "/rst").await;
    stream.reset();
    backend.next_disconnect(&token, "client_closed").await;
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn client_close_is_noticed_without_any_write() {
    // No heartbeat is due and nothing is sent: the gateway must still see the FIN.
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .spawn()
        .await;
    let (stream, token) = gw.open(&mut backend, "/fin").await;
    drop(stream);
    backend.next_disconnect(&token, "client_closed").await;
}

#[tokio::test]
async fn server_close_then_client_close_is_still_one_disconnect() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let (mut s, token) = gw.open(&mut backend, "/sc").await;
    gw.send_ok(&json!({"token": token, "close": true})).await;
    assert_eq!(s.end(SOON).await.0, End::Clean);
    let cb = backend.next_disconnect(&token, "server_closed").await;
    assert_eq!(cb.body["request"]["url"], "/sc");
    drop(s);
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn failing_disconnect_callback_is_not_retried_and_frees_the_connection() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    backend.on_disconnect(Reply::status(500).body(r#"{"error":"boom"}"#));
    let (s, token) = gw.open(&mut backend, "/fail").await;
    drop(s);
    backend.next_disconnect(&token, "client_closed").await;
    backend.expect_none(Duration::from_millis(1000)).await;
    gw.send(&json!({"token": token, "event": {"data": "x"}}))
        .await
        .assert_json(404, json!({"error": "Token not found"}));
    gw.wait_metrics(SOON, |m| m.get("sse_gateway_connections", &[]) == Some(0.0))
        .await;
}

#[tokio::test]
async fn disconnect_callback_to_a_dead_backend_frees_the_connection() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("CALLBACK_TIMEOUT_MS", "500")
        .spawn()
        .await;
    backend.on_disconnect(Reply::ok().delay(Duration::from_secs(30)));
    let (s, token) = gw.open(&mut backend, "/dead").await;
    drop(s);
    backend.next_disconnect(&token, "client_closed").await;
    gw.wait_metrics(SOON, |m| m.get("sse_gateway_connections", &[]) == Some(0.0))
        .await;
    gw.send(&json!({"token": token, "close": true}))
        .await
        .assert_json(404, json!({"error": "Token not found"}));
}

#[tokio::test]
async fn a_burst_of_disconnects_is_each_reported_once_over_reused_connections() {
    const N: usize = 40;
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut streams = Vec::new();
    let mut tokens = HashSet::new();
    for i in 0..N {
        let (s, token) = gw.open(&mut backend, &format!("/burst/{i}")).await;
        streams.push(s);
        tokens.insert(token);
    }
    let after_connects = backend.connections();
    assert!(
        after_connects <= 4,
        "{N} sequential connect callbacks used {after_connects} backend connections (no keep-alive)"
    );
    // Everybody leaves at once.
    let mut closing = JoinSet::new();
    for s in streams {
        closing.spawn(async move { drop(s) });
    }
    while closing.join_next().await.is_some() {}
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..N {
        let cb = backend.next().await;
        assert_eq!(cb.action(), "disconnect");
        assert_eq!(cb.reason(), Some("client_closed"));
        *seen.entry(cb.token().to_owned()).or_default() += 1;
    }
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), tokens);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    backend.expect_none(QUIET).await;
    let total = backend.connections();
    assert!(
        total < after_connects + N,
        "{N} disconnects opened {} new backend connections: one socket each",
        total - after_connects
    );
}

#[tokio::test]
async fn streams_refused_for_capacity_or_config_never_call_back() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_CONNECTIONS", "1")
        .spawn()
        .await;
    let (s, token) = gw.open(&mut backend, "/only").await;
    let r = open_stream(gw.addr, "/extra").await.err().expect("refused");
    assert_eq!(r.status(), 503);
    drop(s);
    backend.next_disconnect(&token, "client_closed").await;
    backend.expect_none(QUIET).await;
}
