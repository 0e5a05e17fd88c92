//! PROTOCOL §9, hostile HTTP: the request head bound (431/414 before any callback), the time bounds
//! (408 for a head not sent within 30 s and for a body not sent within `BODY_TIMEOUT_SECONDS`),
//! refusals that reach a client which writes its whole body before reading (lingering close), and
//! the memory an accepted stream keeps for a big head. Each bound is tested at the bound and one past.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::http::{open_stream_with, parse_head, HttpConn};
use common::{Backend, Gateway, Response, SOON};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

/// `MAX_HEADER_BYTES`'s default.
const BOUND: usize = 16 * 1024;
/// How long a refused request waits to be sure no callback follows.
const QUIET: Duration = Duration::from_millis(300);

/// A GET whose head is exactly `len` bytes as sent: request line, `Host`, `extra` (whole field
/// lines), `X-Pad`, final CRLF.
fn get_head_of(addr: SocketAddr, target: &str, extra: &str, len: usize) -> Vec<u8> {
    let head =
        |pad: &str| format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n{extra}X-Pad: {pad}\r\n\r\n");
    let fixed = head("").len();
    assert!(len >= fixed, "{len} is too short for {target}");
    let head = head(&"p".repeat(len - fixed));
    assert_eq!(head.len(), len);
    head.into_bytes()
}

/// Writes `bytes` on a fresh connection, reads one answer, and checks that the gateway closes the
/// connection after it (EOF, not a reset).
async fn refused(addr: SocketAddr, bytes: &[u8]) -> Response {
    let mut conn = HttpConn::connect(addr).await;
    conn.write_all(bytes).await.expect("write the request");
    let answer = conn
        .try_read_response("GET")
        .await
        .expect("an answer, not a reset");
    let after = conn.try_read_head().await;
    match after {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        other => panic!("expected the connection closed after the answer, got {other:?}"),
    }
    answer
}

/// Reads until EOF; true if the peer closed (FIN or reset) within `within`.
async fn closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut sink = [0u8; 4096];
    loop {
        match timeout(
            deadline.saturating_duration_since(Instant::now()),
            sock.read(&mut sink),
        )
        .await
        {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads one whole answer from a raw socket (Content-Length framed, as every refusal is).
async fn read_answer(sock: &mut TcpStream, within: Duration) -> Option<(u16, String)> {
    let deadline = Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((head, used)) = parse_head(&buf) {
            let len: usize = head
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if buf.len() >= used + len {
                let body = String::from_utf8_lossy(&buf[used..used + len]).into_owned();
                return Some((head.status, body));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, sock.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

#[tokio::test]
async fn a_head_at_the_bound_opens_a_stream_and_one_byte_more_is_431_without_a_callback() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;

    let mut conn = HttpConn::connect(gw.addr).await;
    conn.write_all(&get_head_of(gw.addr, "/at-bound", "", BOUND))
        .await
        .unwrap();
    let head = conn.try_read_head().await.expect("a stream head");
    assert_eq!(head.status, 200, "a head of exactly MAX_HEADER_BYTES opens");
    assert_eq!(backend.next_connect().await.url(), "/at-bound");

    let too_large = json!({"error": "Request header fields too large"});
    // One past: parsed by hyper, refused by the gateway before routing.
    refused(gw.addr, &get_head_of(gw.addr, "/one-past", "", BOUND + 1))
        .await
        .assert_json(431, too_large.clone());
    // Past what the gateway lets hyper buffer: refused while it is still being read.
    refused(gw.addr, &get_head_of(gw.addr, "/20k", "", 20 * 1024))
        .await
        .assert_json(431, too_large.clone());
    // Many small fields count as much as one big one.
    let mut many = format!("GET /many HTTP/1.1\r\nHost: {}\r\n", gw.addr);
    for i in 0..90 {
        many.push_str(&format!("X-Field-{i}: {}\r\n", "v".repeat(200)));
    }
    many.push_str("\r\n");
    assert!(many.len() > BOUND);
    refused(gw.addr, many.as_bytes())
        .await
        .assert_json(431, too_large);
    backend.expect_none(QUIET).await;

    // The bound is configurable and applies to /internal/* as well.
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_HEADER_BYTES", "2048")
        .spawn()
        .await;
    let close = "Connection: close\r\n";
    refused(gw.addr, &get_head_of(gw.addr, "/healthz", close, 2048))
        .await
        .assert_json(200, json!({"status": "ok"}));
    refused(gw.addr, &get_head_of(gw.addr, "/healthz", close, 2049))
        .await
        .assert_json(431, json!({"error": "Request header fields too large"}));
    backend.expect_none(QUIET).await;
}

#[tokio::test]
async fn a_target_over_the_bound_is_414_and_one_at_the_bound_is_431() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let target = |len: usize| format!("/{}", "t".repeat(len - 1));
    let get = |target: &str| format!("GET {target} HTTP/1.1\r\nHost: {}\r\n\r\n", gw.addr);

    // The target alone at the bound: the head is over, the target is not.
    refused(gw.addr, get(&target(BOUND)).as_bytes())
        .await
        .assert_json(431, json!({"error": "Request header fields too large"}));
    refused(gw.addr, get(&target(BOUND + 1)).as_bytes())
        .await
        .assert_json(414, json!({"error": "URI too long"}));
    refused(gw.addr, get(&target(64 * 1024)).as_bytes())
        .await
        .assert_json(414, json!({"error": "URI too long"}));
    backend.expect_none(QUIET).await;
}

/// Runs Python's `http.client` (which writes the whole body before it reads) `tries` times: a POST
/// of `kib` KiB to `/internal/send`; returns how many read exactly `status` with `error`, and what
/// the others got.
async fn python_posts(
    addr: SocketAddr,
    kib: usize,
    tries: usize,
    status: u16,
    error: &str,
) -> serde_json::Value {
    let script = r#"
import http.client, json, sys
port, kib, tries, status, error = sys.argv[1:6]
body = b'{"token":"x","event":{"data":"' + b'a' * (int(kib) * 1024) + b'"}}'
ok, failures = 0, {}
for _ in range(int(tries)):
    try:
        c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
        c.request("POST", "/internal/send", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        if r.status == int(status) and json.loads(data) == {"error": error}:
            ok += 1
            continue
        key = "%d %r" % (r.status, data)
    except Exception as e:
        key = repr(e)
    failures[key] = failures.get(key, 0) + 1
print(json.dumps({"ok": ok, "failures": failures}))
"#;
    let args: Vec<String> = vec![
        "-c".into(),
        script.into(),
        addr.port().to_string(),
        kib.to_string(),
        tries.to_string(),
        status.to_string(),
        error.into(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(&args)
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Without a lingering close the 413 is lost to a reset (BrokenPipeError) about half the time.
#[tokio::test]
async fn python_http_client_reads_its_413_fifty_times_of_fifty() {
    let backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let result = python_posts(gw.addr, 1200, 50, 413, "Payload too large").await;
    assert_eq!(result, json!({"ok": 50, "failures": {}}));
}

/// Any early answer to a request whose body was not read reaches the client, not only a 413
/// (without the lingering close, about half of these were a BrokenPipeError).
#[tokio::test]
async fn python_http_client_reads_a_401_sent_before_its_body_was_read() {
    let backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("INTERNAL_SECRET", "s3cret")
        .spawn()
        .await;
    let result = python_posts(gw.addr, 512, 20, 401, "Unauthorized").await;
    assert_eq!(result, json!({"ok": 20, "failures": {}}));
}

#[tokio::test]
async fn a_body_within_body_timeout_is_read_and_a_stalled_one_is_408_then_closed() {
    const BODY_TIMEOUT: Duration = Duration::from_secs(2);
    let backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("BODY_TIMEOUT_SECONDS", "2")
        .spawn()
        .await;
    let body = br#"{"token":"00000000-0000-4000-8000-000000000000","close":true}"#;
    let head = format!(
        "POST /internal/send HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );

    // At the bound: the rest of the body comes well within the timeout and the request is served.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body[..10]).await.unwrap();
    tokio::time::sleep(BODY_TIMEOUT / 2).await;
    slow.write_all(&body[10..]).await.unwrap();
    let (status, answer) = read_answer(&mut slow, SOON).await.expect("an answer");
    assert_eq!(
        (status, answer.as_str()),
        (404, r#"{"error":"Token not found"}"#)
    );

    // Past it: 10 of 100 bytes, then nothing.
    let mut stalled = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    stalled
        .write_all(
            b"POST /internal/send HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    let (status, answer) = read_answer(&mut stalled, BODY_TIMEOUT + SOON)
        .await
        .expect("a 408");
    let waited = started.elapsed();
    assert_eq!(
        (status, answer.as_str()),
        (408, r#"{"error":"Request timeout"}"#)
    );
    assert!(
        waited >= BODY_TIMEOUT - Duration::from_millis(100),
        "408 after {waited:?}, before BODY_TIMEOUT_SECONDS"
    );
    assert!(
        closed_within(&mut stalled, SOON).await,
        "connection closed after the 408"
    );
}

/// hyper's header read timeout is 30 s; this is the one test that waits for it. Four connections
/// run side by side: one that never sends a byte, one that sends half a head, one idle keep-alive
/// connection after an answered request, and one that completes its head shortly before the bound.
#[tokio::test]
async fn heads_not_sent_within_30_s_are_408_then_closed() {
    const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    let addr = gw.addr;

    async fn expect_408(mut sock: TcpStream, since: Instant, what: &str) {
        let (status, body) = read_answer(&mut sock, HEADER_TIMEOUT + SOON)
            .await
            .unwrap_or_else(|| panic!("{what}: no 408"));
        let waited = since.elapsed();
        assert_eq!(
            (status, body.as_str()),
            (408, r#"{"error":"Request timeout"}"#),
            "{what}"
        );
        assert!(
            waited >= HEADER_TIMEOUT - Duration::from_secs(1),
            "{what}: 408 after only {waited:?}"
        );
        assert!(closed_within(&mut sock, SOON).await, "{what}: not closed");
    }

    let silent = async {
        let sock = TcpStream::connect(addr).await.unwrap();
        expect_408(sock, Instant::now(), "a connection that never sent a byte").await;
    };
    let half = async {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        let since = Instant::now();
        sock.write_all(b"GET /half HTTP/1.1\r\nHost: gw\r\n")
            .await
            .unwrap();
        expect_408(sock, since, "half a head").await;
    };
    let idle = async {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        let (status, _) = read_answer(&mut sock, SOON).await.expect("healthz");
        assert_eq!(status, 200);
        expect_408(sock, Instant::now(), "an idle keep-alive connection").await;
    };
    let in_time = async {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
            .await
            .unwrap();
        tokio::time::sleep(HEADER_TIMEOUT - Duration::from_secs(5)).await;
        sock.write_all(b"Connection: close\r\n\r\n").await.unwrap();
        let (status, _) = read_answer(&mut sock, SOON)
            .await
            .expect("an answer to a head completed in time");
        assert_eq!(status, 200);
    };
    tokio::join!(silent, half, idle, in_time);
    backend.expect_none(QUIET).await;
}

fn pss_bytes(pid: u32) -> u64 {
    let rollup =
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    let kib: u64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("Pss in smaps_rollup");
    kib * 1024
}

/// An accepted stream keeps a copy of its request for the disconnect callback; with a
/// 15 KiB cookie that copy is the stream's biggest cost, and it must be about what was sent.
#[tokio::test]
async fn a_thousand_streams_with_15_kib_of_headers_stay_within_their_budget() {
    const STREAMS: usize = 1000;
    const COOKIE: usize = 15 * 1024;
    const PER_STREAM_BUDGET: u64 = (COOKIE + 4 * 1024) as u64;
    const AT_ONCE: usize = 20;
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("HEARTBEAT_INTERVAL_SECONDS", "3600")
        .spawn()
        .await;
    let cookie = format!("session={}", "c".repeat(COOKIE - "session=".len()));
    let open = |i: usize| {
        let cookie = cookie.clone();
        let addr = gw.addr;
        async move {
            match open_stream_with(
                addr,
                &format!("/s/{i}"),
                &[("Cookie", cookie.as_bytes())],
                None,
            )
            .await
            {
                Ok(stream) => stream,
                Err(r) => panic!("stream {i} refused: {} {}", r.status(), r.text()),
            }
        }
    };
    // Opens streams `ids`, AT_ONCE at a time, and checks each connect callback got the cookie.
    let open_all = |ids: std::ops::Range<usize>| async {
        let mut opened = Vec::with_capacity(ids.len());
        for batch in ids.collect::<Vec<_>>().chunks(AT_ONCE) {
            let mut set = JoinSet::new();
            for &i in batch {
                set.spawn(open(i));
            }
            while let Some(stream) = set.join_next().await {
                opened.push(stream.unwrap());
            }
        }
        opened
    };
    // Warm up with one batch: the runtime, the callback pool, and the allocator's pages for what a
    // batch of connections holds only while it opens (hyper's buffers, the connect callback's
    // body) are not per stream.
    let mut streams = open_all(0..AT_ONCE).await;
    for _ in 0..AT_ONCE {
        backend.next_connect().await;
    }
    let before = pss_bytes(gw.pid);

    streams.extend(open_all(AT_ONCE..AT_ONCE + STREAMS).await);
    for _ in 0..STREAMS {
        let cb = backend.next_connect().await;
        assert_eq!(cb.body["request"]["headers"]["cookie"], cookie.as_str());
    }
    // What the streams keep, not what opening them left free: the gateway hands freed pages back
    // to the OS within a second or two of going idle (src/memory.rs), so the lowest reading over
    // a few seconds is the steady state.
    let mut after = pss_bytes(gw.pid);
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = after.min(pss_bytes(gw.pid));
    }
    let per_stream = after.saturating_sub(before) / STREAMS as u64;
    println!(
        "{STREAMS} streams with a {COOKIE} B cookie: PSS {before} -> {after} B, {per_stream} B per stream (budget {PER_STREAM_BUDGET})"
    );
    assert!(
        per_stream < PER_STREAM_BUDGET,
        "{per_stream} B per stream is over the {PER_STREAM_BUDGET} B budget"
    );
    assert_eq!(streams.len(), STREAMS + AT_ONCE);
}

/// Writes `chunk` every `every` until a write fails; returns the bytes written and when it failed
/// (`None` if nothing failed within `within`).
async fn write_until_refused(
    sock: &mut TcpStream,
    chunk: &[u8],
    every: Duration,
    within: Duration,
) -> (usize, Option<Duration>) {
    let started = Instant::now();
    let mut written = 0;
    while started.elapsed() < within {
        match timeout(within, sock.write_all(chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            Ok(Err(_)) => return (written, Some(started.elapsed())),
            Err(_) => break,
        }
        if !every.is_zero() {
            tokio::time::sleep(every).await;
        }
    }
    (written, None)
}

/// After an early answer the gateway reads and discards for up to 2 s, or until it discarded
/// `MAX_SEND_BYTES` + 1 MiB, then closes (a write after the close is refused with a reset).
#[tokio::test]
async fn a_lingering_close_lasts_up_to_2_s_or_max_send_bytes_plus_1_mib() {
    const LINGER_TIME: Duration = Duration::from_secs(2);
    const MAX_SEND: usize = 1024;
    let backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("MAX_SEND_BYTES", MAX_SEND.to_string())
        .spawn()
        .await;
    let declared = b"POST /internal/send HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000000\r\n\r\n";

    // A trickle: the time bound ends the linger.
    let mut trickle = TcpStream::connect(gw.addr).await.unwrap();
    trickle.write_all(declared).await.unwrap();
    let (status, _) = read_answer(&mut trickle, SOON).await.expect("a 413");
    assert_eq!(status, 413);
    let (_, refused_at) = write_until_refused(
        &mut trickle,
        b"x",
        Duration::from_millis(50),
        3 * LINGER_TIME,
    )
    .await;
    let refused_at = refused_at.expect("the gateway closed after lingering");
    assert!(
        refused_at >= LINGER_TIME - Duration::from_millis(300),
        "closed after {refused_at:?}, before the 2 s linger"
    );
    assert!(
        refused_at <= LINGER_TIME + Duration::from_millis(1500),
        "closed after {refused_at:?}"
    );

    // A flood: the byte bound ends it long before 2 s, and everything up to it was taken.
    let mut flood = TcpStream::connect(gw.addr).await.unwrap();
    flood.write_all(declared).await.unwrap();
    let (status, _) = read_answer(&mut flood, SOON).await.expect("a 413");
    assert_eq!(status, 413);
    let (written, refused_at) = write_until_refused(
        &mut flood,
        &[b'y'; 64 * 1024],
        Duration::ZERO,
        3 * LINGER_TIME,
    )
    .await;
    let refused_at = refused_at.expect("the gateway closed after discarding its bound");
    assert!(
        written >= MAX_SEND + (1 << 20),
        "refused after only {written} B"
    );
    assert!(
        refused_at < LINGER_TIME / 2,
        "the byte bound did not end the linger ({refused_at:?}, {written} B)"
    );
}
