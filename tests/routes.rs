//! PROTOCOL §1: listeners and routes — probes, method rules, `/internal/*` never being a stream,
//! JSON answers that are never compressed.

mod common;

use std::time::Duration;

use common::http::{get, open_stream, request};
use common::{Backend, Gateway};
use serde_json::json;

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn healthz_is_ok_json_and_never_compressed() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let r = request(
        gw.addr,
        "GET",
        "/healthz",
        &[("Accept-Encoding", b"gzip, deflate, br")],
        None,
    )
    .await;
    r.assert_json(200, json!({"status": "ok"}));
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn healthz_is_ok_even_without_callback_url() {
    let gw = Gateway::builder().spawn().await;
    get(gw.addr, "/healthz")
        .await
        .assert_json(200, json!({"status": "ok"}));
}

#[tokio::test]
async fn readyz_is_ready_when_configured() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    get(gw.addr, "/readyz")
        .await
        .assert_json(200, json!({"status": "ready", "configured": true}));
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn readyz_is_not_ready_without_callback_url() {
    let gw = Gateway::builder().spawn().await;
    get(gw.addr, "/readyz")
        .await
        .assert_json(503, json!({"status": "not_ready", "configured": false}));
}

#[tokio::test]
async fn post_healthz_is_405_allow_get() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    for path in ["/healthz", "/readyz"] {
        let r = request(gw.addr, "POST", path, &[], Some(b"{}")).await;
        r.assert_json(405, json!({"error": "Method not allowed"}));
        assert_eq!(r.header("allow").as_deref(), Some("GET"), "{path}");
    }
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn other_methods_on_a_stream_path_are_405_allow_get_without_callback() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/events", "/", "/a/b?c=d"] {
            let r = request(gw.addr, method, path, &[], Some(b"x")).await;
            r.assert_json(405, json!({"error": "Method not allowed"}));
            assert_eq!(r.header("allow").as_deref(), Some("GET"), "{method} {path}");
        }
    }
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn get_internal_send_is_405_allow_post_and_never_a_stream() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let r = get(gw.addr, "/internal/send").await;
    r.assert_json(405, json!({"error": "Method not allowed"}));
    assert_eq!(r.header("allow").as_deref(), Some("POST"));
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn unknown_internal_paths_are_404_and_never_streams() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    for (method, path) in [
        ("GET", "/internal/nope"),
        ("POST", "/internal/nope"),
        ("GET", "/internal/"),
        ("GET", "/internal/send/extra"),
        ("GET", "/internal/other?x=1"),
    ] {
        let body = (method == "POST").then_some(&b"{}"[..]);
        let r = request(gw.addr, method, path, &[], body).await;
        r.assert_json(404, json!({"error": "Not found"}));
    }
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn metrics_is_prometheus_text() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let r = request(
        gw.addr,
        "GET",
        "/metrics",
        &[("Accept-Encoding", b"gzip")],
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    assert_eq!(r.header("content-encoding"), None);
    assert!(r.text().contains("sse_gateway_connections"), "{}", r.text());
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn any_other_get_path_and_query_opens_a_stream() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut open = Vec::new();
    for target in [
        "/",
        "/events",
        "/deep/er/path?q=1&r=two",
        "/healthzz",
        "/metrics/x",
        "/internalx",
    ] {
        let stream = open_stream(gw.addr, target)
            .await
            .unwrap_or_else(|r| panic!("GET {target}: {} {}", r.status(), r.text()));
        assert_eq!(stream.head.status, 200);
        let cb = backend.next_connect().await;
        assert_eq!(cb.url(), target);
        open.push(stream);
    }
}

#[tokio::test]
async fn two_requests_on_one_keep_alive_connection() {
    let backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let mut conn = common::HttpConn::connect(gw.addr).await;
    conn.request("GET", "/healthz", &[], None)
        .await
        .assert_json(200, json!({"status": "ok"}));
    conn.request("GET", "/readyz", &[], None)
        .await
        .assert_json(200, json!({"status": "ready", "configured": true}));
}
