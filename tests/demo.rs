//! Demo mode, black-box: the real binary started as `sse-gateway demo` on 127.0.0.1 with PORT=0,
//! spoken to over real TCP with a small blocking HTTP/1.1 client (no gateway code involved).
//! The page itself runs in a real browser in `tests/browser/` (see `.ci/run`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SOON: Duration = Duration::from_secs(10);

/// The gateway child process; killed on drop.
struct Gateway {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Gateway {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sse-gateway"));
        cmd.args(args).env_clear().envs(env.iter().copied());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting sse-gateway");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Gateway {
            child,
            stdout,
            stderr,
        }
    }

    /// The first line on `stream` containing `needle`, within `SOON`.
    fn line(stream: &mpsc::Receiver<String>, needle: &str) -> String {
        let deadline = Instant::now() + SOON;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stream.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(err) => panic!("no line with {needle:?}: {err}"),
            }
        }
    }

    /// `host:port` from the `<role> listener on http://...` start-up line.
    fn listener(&self, role: &str) -> String {
        let line = Gateway::line(&self.stderr, &format!("{role} listener on http://"));
        line.rsplit("http://").next().unwrap().trim().to_owned()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the gateway did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One request on a fresh connection with `Connection: close`; reads to EOF.
fn request(addr: &str, method: &str, target: &str, body: &str) -> Answer {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(SOON)).unwrap();
    write!(
        conn,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// An open SSE stream; the raw bytes read so far (chunk framing included) are searched as text.
struct Stream {
    conn: TcpStream,
    seen: String,
}

impl Stream {
    fn open(addr: &str, target: &str) -> Stream {
        let mut conn = TcpStream::connect(addr).unwrap();
        write!(
            conn,
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        let mut stream = Stream {
            conn,
            seen: String::new(),
        };
        stream.wait_for("\r\n\r\n");
        assert!(stream.seen.starts_with("HTTP/1.1 200"), "{}", stream.seen);
        assert!(stream.seen.contains("content-type: text/event-stream"));
        stream
    }

    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + SOON;
        let mut buf = [0u8; 4096];
        while !self.seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "never saw {needle:?} in {:?}", self.seen);
            self.conn.set_read_timeout(Some(left)).unwrap();
            let n = self.conn.read(&mut buf).expect("reading the stream");
            assert!(n > 0, "stream ended before {needle:?}: {:?}", self.seen);
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
}

fn token_of(addr: &str, id: &str) -> Answer {
    request(addr, "GET", &format!("/_demo/token?id={id}"), "")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

#[test]
fn demo_mode_serves_its_page_and_wires_a_stream_to_the_real_internal_api() {
    let gw = Gateway::start(&["demo"], &[("PORT", "0")]);
    let addr = gw.listener("public");
    // HOST defaults to loopback in demo mode, and the URL to open is printed on stdout.
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let open = Gateway::line(&gw.stdout, "open ");
    assert!(
        open.ends_with(&format!("open http://{addr}/_demo/")),
        "{open}"
    );

    let page = request(&addr, "GET", "/_demo/", "");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.body.contains("<title>sse-gateway demo</title>"));
    assert!(page.body.contains("/demo/stream?demo_id="));

    let before = token_of(&addr, "t1");
    assert_eq!(before.status, 404);
    assert_eq!(json(&before.body), json(r#"{"error":"Unknown demo id"}"#));

    // The built-in backend accepts the stream and remembers its token under the page's demo_id.
    let mut stream = Stream::open(&addr, "/demo/stream?demo_id=t1");
    let answer = token_of(&addr, "t1");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let token = json(&answer.body)["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 36, "{token}");

    let body = serde_json::json!({"token": token, "event": {"name": "greeting", "data": "hi\nthere", "id": "1"}});
    let sent = request(&addr, "POST", "/internal/send", &body.to_string());
    assert_eq!(
        (sent.status, json(&sent.body)),
        (200, json(r#"{"status":"ok"}"#))
    );
    stream.wait_for("event: greeting\nid: 1\ndata: hi\ndata: there\n\n");

    // The connect answer put the stream in channel `demo` (PROTOCOL §8).
    let body = r#"{"channel":"demo","event":{"data":"to everyone"}}"#;
    let published = request(&addr, "POST", "/internal/publish", body);
    assert_eq!(
        (published.status, json(&published.body)),
        (200, json(r#"{"status":"ok","delivered":1}"#))
    );
    stream.wait_for("data: to everyone\n\n");

    // Closing the stream makes the backend forget the token (its disconnect callback).
    let close = serde_json::json!({"token": token, "close": true});
    let closed = request(&addr, "POST", "/internal/send", &close.to_string());
    assert_eq!(closed.status, 200);
    let deadline = Instant::now() + SOON;
    while token_of(&addr, "t1").status != 404 {
        assert!(Instant::now() < deadline, "the token outlived its stream");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The demo paths answer only what they know.
    assert_eq!(request(&addr, "GET", "/_demo/nothing", "").status, 404);
    assert_eq!(
        request(&addr, "GET", "/_demo/token?id=../x", "").status,
        400
    );
    let post = request(&addr, "POST", "/_demo/", "{}");
    assert_eq!((post.status, post.header("allow")), (405, Some("GET")));
    let bare = request(&addr, "GET", "/_demo", "");
    assert_eq!(
        (bare.status, bare.header("location")),
        (308, Some("/_demo/"))
    );
}

#[test]
fn outside_demo_mode_demo_paths_are_stream_paths() {
    // No CALLBACK_URL: a stream path answers 503 "Service not configured" (PROTOCOL §2).
    let gw = Gateway::start(&[], &[("PORT", "0"), ("HOST", "127.0.0.1")]);
    let addr = gw.listener("public");
    for target in ["/_demo/", "/_demo/token?id=x", "/_demo"] {
        let answer = request(&addr, "GET", target, "");
        assert_eq!(answer.status, 503, "{target}");
        assert_eq!(
            json(&answer.body),
            json(r#"{"error":"Service not configured"}"#)
        );
    }
    let answer = request(&addr, "POST", "/_demo/", "");
    assert_eq!(answer.status, 405);
    assert!(gw.stdout.try_recv().is_err(), "no demo URL is printed");
}

#[test]
fn demo_mode_keeps_the_internal_listener_free_of_demo_paths() {
    let gw = Gateway::start(
        &["demo"],
        &[("PORT", "0"), ("INTERNAL_PORT", "0"), ("LOG_LEVEL", "warn")],
    );
    let public = gw.listener("public");
    let internal = gw.listener("internal");
    assert_eq!(request(&public, "GET", "/_demo/", "").status, 200);
    assert_eq!(request(&internal, "GET", "/_demo/", "").status, 404);
    // The page's buttons cannot reach /internal/* on the public port, and the operator is told.
    Gateway::line(&gw.stderr, "demo: INTERNAL_PORT or INTERNAL_SECRET is set");
}

#[test]
fn demo_mode_still_refuses_a_malformed_setting() {
    let mut gw = Gateway::start(
        &["demo"],
        &[("PORT", "0"), ("HEARTBEAT_INTERVAL_SECONDS", "0")],
    );
    let line = Gateway::line(&gw.stderr, "HEARTBEAT_INTERVAL_SECONDS");
    assert!(line.contains("invalid"), "{line}");
    assert_eq!(gw.wait_exit().code(), Some(2));
}
