//! Unit tests of the test harness itself: the WHATWG SSE parser, the chunked decoder, the HTTP
//! head parser, the small format checkers and the Redis helper. No gateway is started here.

mod common;

use common::http::{parse_head, ChunkedDecoder};
use common::sse::{events, parse_all, Event, Item, Parser};
use common::{is_log_line, is_rfc3339, is_uuid_v4, Metrics, Redis};

fn ev(event: &str, data: &str, id: &str) -> Event {
    Event {
        event: event.into(),
        data: data.into(),
        last_event_id: id.into(),
        retry: None,
    }
}

#[test]
fn lf_cr_and_crlf_all_end_lines() {
    for sep in ["\n", "\r", "\r\n"] {
        let stream = format!("data: a{sep}data: b{sep}{sep}");
        assert_eq!(
            events(stream.as_bytes()),
            vec![ev("message", "a\nb", "")],
            "{sep:?}"
        );
    }
    // Mixed line endings in one stream.
    assert_eq!(
        events(b"event: x\rdata: 1\r\ndata: 2\n\r\ndata: 3\n\n"),
        vec![ev("x", "1\n2", ""), ev("message", "3", "")]
    );
}

#[test]
fn split_anywhere_including_between_cr_and_lf() {
    let stream = b"event: e\r\ndata: one\r\ndata: two\r\n\r\n: c\r\ndata: x\r\r";
    let whole = parse_all(stream);
    for cut in 0..stream.len() {
        let mut p = Parser::new();
        let mut items = p.feed(&stream[..cut]);
        items.extend(p.feed(&stream[cut..]));
        items.extend(p.finish());
        assert_eq!(items, whole, "cut at {cut}");
    }
    // Byte by byte.
    let mut p = Parser::new();
    let mut items = Vec::new();
    for b in stream {
        items.extend(p.feed(&[*b]));
    }
    items.extend(p.finish());
    assert_eq!(items, whole);
    assert_eq!(
        whole,
        vec![
            Item::Event(ev("e", "one\ntwo", "")),
            Item::Comment("c".into()),
            Item::Event(ev("message", "x", "")),
        ]
    );
}

#[test]
fn a_cr_then_lf_in_the_next_read_is_one_line_break() {
    let mut p = Parser::new();
    assert!(p.feed(b"data: a\r").is_empty());
    // If the CR had ended the line and the LF made a blank one, this would dispatch now.
    assert!(p.feed(b"\n").is_empty());
    assert_eq!(p.feed(b"\n"), vec![Item::Event(ev("message", "a", ""))]);
}

#[test]
fn comments_are_counted_and_not_events() {
    let mut p = Parser::new();
    let items = p.feed(b": heartbeat\n\n:\n\n:no space\n\n");
    assert_eq!(
        items,
        vec![
            Item::Comment("heartbeat".into()),
            Item::Comment("".into()),
            Item::Comment("no space".into()),
        ]
    );
    assert_eq!(p.comments, 3);
}

#[test]
fn field_value_rules() {
    // No colon: the whole line is the field name with an empty value.
    assert_eq!(events(b"data\n\n"), vec![ev("message", "", "")]);
    // No space after the colon; only one space is removed.
    assert_eq!(events(b"data:x\n\n"), vec![ev("message", "x", "")]);
    assert_eq!(events(b"data:  x\n\n"), vec![ev("message", " x", "")]);
    // A value may contain colons.
    assert_eq!(events(b"data: a: b\n\n"), vec![ev("message", "a: b", "")]);
    // Unknown fields and field names with other case are ignored.
    assert_eq!(
        events(b"foo: bar\nData: no\ndata: yes\n\n"),
        vec![ev("message", "yes", "")]
    );
}

#[test]
fn empty_data_line_dispatches_empty_string_but_no_data_does_not() {
    assert_eq!(events(b"data: \n\n"), vec![ev("message", "", "")]);
    assert_eq!(events(b"data:\n\n"), vec![ev("message", "", "")]);
    assert_eq!(events(b"event: x\n\n"), vec![]);
    assert_eq!(events(b"id: 1\n\n"), vec![]);
    // Two empty lines: data is "\n".
    assert_eq!(events(b"data\ndata\n\n"), vec![ev("message", "\n", "")]);
}

#[test]
fn event_type_resets_after_dispatch_and_after_dataless_frames() {
    assert_eq!(
        events(b"event: a\ndata: 1\n\ndata: 2\n\nevent: b\n\ndata: 3\n\n"),
        vec![
            ev("a", "1", ""),
            ev("message", "2", ""),
            ev("message", "3", "")
        ]
    );
    // An empty event field means the default type.
    assert_eq!(events(b"event:\ndata: 1\n\n"), vec![ev("message", "1", "")]);
}

#[test]
fn last_event_id_persists_and_ignores_nul() {
    assert_eq!(
        events(b"id: 7\ndata: a\n\ndata: b\n\nid: 8\0x\ndata: c\n\nid\ndata: d\n\n"),
        vec![
            ev("message", "a", "7"),
            ev("message", "b", "7"),
            ev("message", "c", "7"),
            ev("message", "d", ""),
        ]
    );
}

#[test]
fn retry_only_when_all_digits() {
    let mut p = Parser::new();
    let items = p.feed(
        b"retry: 5000\ndata: a\n\nretry: 12x\ndata: b\n\nretry: -1\ndata: c\n\nretry:\ndata: d\n\n",
    );
    let retries: Vec<_> = items
        .iter()
        .map(|i| match i {
            Item::Event(e) => e.retry,
            Item::Comment(_) => panic!("no comments here"),
        })
        .collect();
    assert_eq!(retries, vec![Some(5000), None, None, None]);
    assert_eq!(p.reconnection_time, Some(5000));
}

#[test]
fn incomplete_event_at_end_is_dropped_and_bom_is_skipped() {
    assert_eq!(
        events(b"data: a\n\ndata: b\n"),
        vec![ev("message", "a", "")]
    );
    assert_eq!(
        events(b"\xEF\xBB\xBFdata: a\n\n"),
        vec![ev("message", "a", "")]
    );
    // A BOM split across reads.
    let mut p = Parser::new();
    assert!(p.feed(b"\xEF").is_empty());
    assert!(p.feed(b"\xBB\xBF").is_empty());
    assert_eq!(
        p.feed(b"data: z\n\n"),
        vec![Item::Event(ev("message", "z", ""))]
    );
    // A BOM later in the stream is data.
    assert_eq!(
        events(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"),
        vec![ev("message", "a", "")]
    );
}

#[test]
fn utf8_split_across_reads() {
    let bytes = "data: café ✓\n\n".as_bytes();
    let mut p = Parser::new();
    let mut items = Vec::new();
    for b in bytes {
        items.extend(p.feed(&[*b]));
    }
    assert_eq!(items, vec![Item::Event(ev("message", "café ✓", ""))]);
}

#[test]
fn whatwg_spec_examples() {
    // From the standard's "Interpreting an event stream" examples.
    assert_eq!(
        events(b"data: YHOO\ndata: +2\ndata: 10\n\n"),
        vec![ev("message", "YHOO\n+2\n10", "")]
    );
    assert_eq!(
        events(b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"),
        vec![
            ev("message", "first event", "1"),
            ev("message", "second event", ""),
            ev("message", " third event", ""),
        ]
    );
    assert_eq!(
        events(b"data\n\ndata\ndata\n\ndata:"),
        vec![ev("message", "", ""), ev("message", "\n", "")]
    );
}

#[test]
fn chunked_decoder_decodes_and_finds_the_terminator() {
    let body = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\n\r\nHTTP/1.1 next";
    let body_len = body.len() - b"HTTP/1.1 next".len();
    for cut in 0..body.len() {
        let mut dec = ChunkedDecoder::new();
        let mut out = Vec::new();
        let a = dec.feed(&body[..cut], &mut out).unwrap();
        assert_eq!(
            a,
            cut.min(body_len),
            "all of a partial body is used, nothing after it"
        );
        let b = dec.feed(&body[cut..], &mut out).unwrap();
        assert!(dec.is_done(), "cut {cut}");
        assert_eq!(out, b"hello 0123456789");
        assert_eq!(&body[a + b..], b"HTTP/1.1 next", "cut {cut}");
    }
    // Without the final CRLF it is not done.
    let mut dec = ChunkedDecoder::new();
    let mut out = Vec::new();
    dec.feed(b"2\r\nab\r\n0\r\n", &mut out).unwrap();
    assert!(!dec.is_done());
    dec.feed(b"\r\n", &mut out).unwrap();
    assert!(dec.is_done());
    // Trailers are skipped.
    let mut dec = ChunkedDecoder::new();
    dec.feed(b"0\r\nX-T: 1\r\n\r\n", &mut out).unwrap();
    assert!(dec.is_done());
    // Bad framing is an error.
    assert!(ChunkedDecoder::new().feed(b"zz\r\n", &mut out).is_err());
    assert!(ChunkedDecoder::new().feed(b"1\r\nab", &mut out).is_err());
}

#[test]
fn head_parser() {
    assert!(parse_head(b"HTTP/1.1 200 OK\r\nA: b\r\n").is_none());
    let buf = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nX:  caf\xe9 \r\n\r\n{}";
    let (h, used) = parse_head(buf).unwrap();
    assert_eq!(h.status, 503);
    assert_eq!(
        h.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(h.headers[1].1, b"caf\xe9");
    assert_eq!(&buf[used..], b"{}");
}

#[test]
fn format_checkers() {
    assert!(is_uuid_v4("3f2b8c1e-9d4a-4b7e-8c21-0a1b2c3d4e5f"));
    assert!(
        !is_uuid_v4("3F2B8C1E-9D4A-4B7E-8C21-0A1B2C3D4E5F"),
        "upper case"
    );
    assert!(
        !is_uuid_v4("3f2b8c1e-9d4a-1b7e-8c21-0a1b2c3d4e5f"),
        "version 1"
    );
    assert!(
        !is_uuid_v4("3f2b8c1e-9d4a-4b7e-7c21-0a1b2c3d4e5f"),
        "variant"
    );
    assert!(
        !is_uuid_v4("3f2b8c1e9d4a4b7e8c210a1b2c3d4e5f"),
        "no hyphens"
    );

    assert!(is_rfc3339("2024-05-01T12:00:00Z"));
    assert!(is_rfc3339("2024-05-01T12:00:00.123456Z"));
    assert!(is_rfc3339("2024-05-01T12:00:00+02:00"));
    assert!(!is_rfc3339("2024-05-01 12:00:00"));
    assert!(!is_rfc3339("2024-05-01T12:00:00."));
    assert!(is_log_line(
        "2024-05-01T12:00:00.5Z [INFO] public listener on http://127.0.0.1:1"
    ));
    assert!(!is_log_line("2024-05-01T12:00:00Z [NOTICE] x"));
    assert!(!is_log_line("2024-05-01T12:00:00Z INFO x"));
    assert!(!is_log_line("[INFO] x"));

    let m = Metrics::parse(
        "# HELP a x\n# TYPE a gauge\na 3\nb_total{reason=\"client_closed\"} 2\nh_bucket{action=\"connect\",le=\"+Inf\"} 5\n",
    );
    assert_eq!(m.get("a", &[]), Some(3.0));
    assert_eq!(m.get("b_total", &[("reason", "client_closed")]), Some(2.0));
    assert_eq!(m.get("b_total", &[("reason", "error")]), None);
    assert_eq!(
        m.get("h_bucket", &[("action", "connect"), ("le", "+Inf")]),
        Some(5.0)
    );
}

/// The Redis helper itself: a real redis-server on a free port that answers PING, keeps no data
/// across a restart on the same port, and stops answering while paused.
#[tokio::test]
async fn redis_helper_starts_pauses_kills_and_restarts_on_the_same_port() {
    use std::time::Duration;
    let mut redis = Redis::start().await;
    let port = redis.addr.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(redis.command(&["SET", "k", "v"]).await, "+OK");
    assert_eq!(redis.command(&["GET", "k"]).await, "v");

    redis.pause();
    assert!(
        !redis.ping(Duration::from_millis(300)).await,
        "paused: no PONG"
    );
    redis.resume();
    assert!(redis.ping(Duration::from_secs(2)).await, "resumed: PONG");

    redis.kill().await;
    assert!(
        !redis.ping(Duration::from_millis(300)).await,
        "killed: no PONG"
    );
    assert!(
        tokio::net::TcpStream::connect(redis.addr).await.is_err(),
        "killed: the port is closed"
    );
    redis.restart().await;
    assert_eq!(redis.addr.port(), port);
    assert!(redis.ping(Duration::from_secs(2)).await);
    assert_eq!(redis.command(&["GET", "k"]).await, "$-1", "no persistence");
}

#[tokio::test]
async fn redis_helper_reads_whole_resp_replies() {
    use common::redis::Resp;
    let redis = Redis::start().await;
    assert_eq!(redis.command(&["RPUSH", "l", "a", "", "c"]).await, ":3");
    assert_eq!(
        redis.query(&["LRANGE", "l", "0", "-1"]).await,
        Resp::Array(Some(vec![
            Resp::Bulk(Some("a".into())),
            Resp::Bulk(Some(String::new())),
            Resp::Bulk(Some("c".into())),
        ]))
    );
    assert_eq!(
        redis.query(&["PUBSUB", "NUMSUB", "nobody"]).await,
        Resp::Array(Some(vec![Resp::Bulk(Some("nobody".into())), Resp::Int(0)]))
    );
    assert!(redis.command(&["NOSUCHCOMMAND"]).await.starts_with("-ERR"));
}
