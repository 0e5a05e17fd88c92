//! A small HTTP/1.1 client over a plain `TcpStream`: requests are written by hand and responses
//! (status line, headers, `Content-Length` or chunked bodies) are parsed by hand, so tests see
//! the raw bytes, the chunked terminator of a clean end, and abrupt closes.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};

use super::sse::{Event, Item, Parser};
use super::SOON;

/// Upper bound for any single request/response exchange in the tests.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Decodes a chunked transfer-coded body incrementally.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataCr,
    DataLf,
    Trailer,
    Done,
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the last chunk (`0\r\n`) and the empty trailer line arrived.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from `input` into `out`; returns how many input bytes were used (input after
    /// the end of the body is left alone).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Size | ChunkState::Trailer => {
                    self.line.push(input[i]);
                    i += 1;
                    if self.line.len() > 4096 {
                        return Err("chunk-size or trailer line too long".into());
                    }
                    if !self.line.ends_with(b"\r\n") {
                        continue;
                    }
                    let line = &self.line[..self.line.len() - 2];
                    if self.state == ChunkState::Trailer {
                        if line.is_empty() {
                            self.state = ChunkState::Done;
                        }
                    } else {
                        let text = std::str::from_utf8(line)
                            .map_err(|_| format!("chunk-size line not ASCII: {line:?}"))?;
                        let hex = text.split(';').next().unwrap_or("").trim();
                        let size = usize::from_str_radix(hex, 16)
                            .map_err(|_| format!("bad chunk-size line {text:?}"))?;
                        self.state = if size == 0 {
                            ChunkState::Trailer
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    self.line.clear();
                }
                ChunkState::Data(left) => {
                    let n = left.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    self.state = if n == left {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left - n)
                    };
                }
                ChunkState::DataCr | ChunkState::DataLf => {
                    let want = if self.state == ChunkState::DataCr {
                        b'\r'
                    } else {
                        b'\n'
                    };
                    if input[i] != want {
                        return Err(format!(
                            "chunk data not followed by CRLF (got {:#x})",
                            input[i]
                        ));
                    }
                    i += 1;
                    self.state = if want == b'\r' {
                        ChunkState::DataLf
                    } else {
                        ChunkState::Size
                    };
                }
            }
        }
        Ok(i)
    }
}

/// A parsed status line and header block.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    /// The first value of a header (name compared case-insensitively), decoded lossily.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
}

/// Parses a response head; `None` while the blank line has not arrived yet.
pub fn parse_head(buf: &[u8]) -> Option<(Head, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = &buf[..end];
    let mut lines = text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    assert!(
        version.starts_with("HTTP/1."),
        "bad status line {status_line:?}"
    );
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = Vec::new();
    for line in lines {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .unwrap_or_else(|| panic!("bad header line {:?}", String::from_utf8_lossy(line)));
        let name = String::from_utf8_lossy(&line[..colon]).trim().to_owned();
        let value = line[colon + 1..].trim_ascii().to_vec();
        headers.push((name, value));
    }
    Some((Head { status, headers }, end + 4))
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Response {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.header(name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    /// Asserts status, a JSON content type, no compression and the exact JSON body.
    #[track_caller]
    pub fn assert_json(&self, status: u16, body: Value) {
        assert_eq!(
            self.status(),
            status,
            "status (body {:?}, headers {:?})",
            self.text(),
            self.head.headers
        );
        let ct = self.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("application/json"),
            "content-type {ct:?} for {status} {:?}",
            self.text()
        );
        assert_eq!(self.header("content-encoding"), None, "no compression");
        assert_eq!(self.json(), body, "body of the {status} answer");
    }
}

/// Encodes one request. `Content-Length` is added for a body unless the caller gave framing.
pub fn encode_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &[u8])],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\n").into_bytes();
    let mut framed = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            framed = true;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if let (Some(b), false) = (body, framed) {
        out.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    out
}

/// One client connection; keeps bytes read past a response for the next one (keep-alive).
pub struct HttpConn {
    pub addr: SocketAddr,
    sock: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> HttpConn {
        let sock = timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect to {addr} timed out"))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        HttpConn::from_stream(addr, sock)
    }

    /// Connects and returns the error instead of panicking (for a port that may be closed).
    pub async fn try_connect(addr: SocketAddr) -> std::io::Result<HttpConn> {
        let sock = timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
        Ok(HttpConn::from_stream(addr, sock))
    }

    pub fn from_stream(addr: SocketAddr, sock: TcpStream) -> HttpConn {
        HttpConn {
            addr,
            sock,
            buf: Vec::new(),
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sock.write_all(bytes).await
    }

    /// Reads more bytes within `within`. `Ok(0)` is EOF; `Err` is a reset or a timeout.
    async fn fill(&mut self, within: Duration) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        match timeout(within, self.sock.read(&mut chunk)).await {
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "read timed out",
            )),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Ok(Err(e)) => Err(e),
        }
    }

    pub async fn try_read_head(&mut self) -> std::io::Result<Head> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some((head, used)) = parse_head(&self.buf) {
                self.buf.drain(..used);
                if (100..200).contains(&head.status) {
                    continue;
                }
                return Ok(head);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self.fill(left).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a response head; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        }
    }

    /// Reads one whole response (for non-streaming answers).
    pub async fn try_read_response(&mut self, method: &str) -> std::io::Result<Response> {
        let head = self.try_read_head().await?;
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut body = Vec::new();
        let no_body = method == "HEAD" || head.status == 204 || head.status == 304;
        if no_body {
        } else if head.is_chunked() {
            let mut dec = ChunkedDecoder::new();
            loop {
                let used = dec
                    .feed(&self.buf, &mut body)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                self.buf.drain(..used);
                if dec.is_done() {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if self.fill(left).await? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "EOF inside chunked body",
                    ));
                }
            }
        } else if let Some(len) = head.header("content-length") {
            let len: usize = len.trim().parse().expect("content-length");
            while self.buf.len() < len {
                let left = deadline.saturating_duration_since(Instant::now());
                if self.fill(left).await? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "EOF inside body",
                    ));
                }
            }
            body = self.buf.drain(..len).collect();
        } else {
            while self
                .fill(deadline.saturating_duration_since(Instant::now()))
                .await?
                > 0
            {}
            body = std::mem::take(&mut self.buf);
        }
        Ok(Response { head, body })
    }

    pub async fn try_request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &[u8])],
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        let bytes = encode_request(self.addr, method, target, headers, body);
        self.sock.write_all(&bytes).await?;
        self.try_read_response(method).await
    }

    pub async fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &[u8])],
        body: Option<&[u8]>,
    ) -> Response {
        self.try_request(method, target, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {target} on {}: {e}", self.addr))
    }

    /// `POST target` with `body` as JSON on this (keep-alive) connection.
    pub async fn post_json(&mut self, target: &str, body: &Value) -> Response {
        let bytes = serde_json::to_vec(body).unwrap();
        self.request(
            "POST",
            target,
            &[("Content-Type", b"application/json")],
            Some(&bytes),
        )
        .await
    }
}

/// One request on a fresh connection that asks to be closed afterwards.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &[u8])],
    body: Option<&[u8]>,
) -> Response {
    let mut all: Vec<(&str, &[u8])> = vec![("Connection", b"close")];
    all.extend_from_slice(headers);
    HttpConn::connect(addr)
        .await
        .request(method, target, &all, body)
        .await
}

pub async fn get(addr: SocketAddr, target: &str) -> Response {
    request(addr, "GET", target, &[], None).await
}

pub async fn post_json(addr: SocketAddr, target: &str, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap();
    request(
        addr,
        "POST",
        target,
        &[("Content-Type", b"application/json")],
        Some(&bytes),
    )
    .await
}

/// How a stream's body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The chunked terminator `0\r\n\r\n` arrived.
    Clean,
    /// EOF or a reset without the terminator.
    Abrupt,
}

/// Why [`SseStream::next_item`] returned no item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoItem {
    Ended(End),
    Timeout,
}

/// An open SSE response being read.
pub struct SseStream {
    pub head: Head,
    conn: HttpConn,
    decoder: ChunkedDecoder,
    parser: Parser,
    pending: std::collections::VecDeque<Item>,
    ended: Option<End>,
    /// Every byte of the body as received (chunk framing included).
    pub raw: Vec<u8>,
    /// The de-chunked body: the event-stream bytes.
    pub payload: Vec<u8>,
}

impl SseStream {
    /// The stream's socket, for a test that only needs the bytes drained, not parsed.
    pub fn into_socket(self) -> TcpStream {
        self.conn.sock
    }
}

/// Opens `GET target` on a fresh connection. `Ok` for a 200 stream, `Err` with the whole answer
/// for any other status.
pub async fn open_stream(addr: SocketAddr, target: &str) -> Result<SseStream, Response> {
    open_stream_with(addr, target, &[], None).await
}

/// The request headers of a page coming back with `last` (if any) as its `Last-Event-ID`.
pub fn last_event_id_header(last: Option<&str>) -> Vec<(&'static str, &[u8])> {
    last.map(|id| vec![("Last-Event-ID", id.as_bytes())])
        .unwrap_or_default()
}

/// As [`open_stream`], with extra request headers and optionally a pre-configured socket
/// (e.g. a tiny receive buffer).
pub async fn open_stream_with(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &[u8])],
    socket: Option<TcpSocket>,
) -> Result<SseStream, Response> {
    let mut conn = match socket {
        None => HttpConn::connect(addr).await,
        Some(s) => {
            let sock = timeout(IO_TIMEOUT, s.connect(addr))
                .await
                .expect("connect timed out")
                .expect("connect");
            HttpConn::from_stream(addr, sock)
        }
    };
    let mut all: Vec<(&str, &[u8])> = vec![("Accept", b"text/event-stream")];
    all.extend_from_slice(headers);
    let req = encode_request(addr, "GET", target, &all, None);
    conn.write_all(&req).await.expect("write stream request");
    let head = conn
        .try_read_head()
        .await
        .unwrap_or_else(|e| panic!("GET {target}: {e}"));
    if head.status != 200 {
        // Re-read the body with the ordinary response reader.
        let mut rest = HttpConn {
            addr,
            sock: conn.sock,
            buf: Vec::new(),
        };
        let body_buf = std::mem::take(&mut conn.buf);
        rest.buf = body_buf;
        let body = read_body_after_head(&mut rest, &head).await;
        return Err(Response { head, body });
    }
    let mut stream = SseStream {
        head,
        conn,
        decoder: ChunkedDecoder::new(),
        parser: Parser::new(),
        pending: Default::default(),
        ended: None,
        raw: Vec::new(),
        payload: Vec::new(),
    };
    let early = std::mem::take(&mut stream.conn.buf);
    stream.absorb(&early);
    Ok(stream)
}

async fn read_body_after_head(conn: &mut HttpConn, head: &Head) -> Vec<u8> {
    // Put a synthetic head back in front so the ordinary reader handles the framing.
    let mut synthetic = format!("HTTP/1.1 {} X\r\n", head.status).into_bytes();
    for (n, v) in &head.headers {
        synthetic.extend_from_slice(n.as_bytes());
        synthetic.extend_from_slice(b": ");
        synthetic.extend_from_slice(v);
        synthetic.extend_from_slice(b"\r\n");
    }
    synthetic.extend_from_slice(b"\r\n");
    synthetic.extend_from_slice(&conn.buf);
    conn.buf = synthetic;
    conn.try_read_response("GET")
        .await
        .map(|r| r.body)
        .unwrap_or_else(|e| panic!("reading a refusal body: {e}"))
}

impl SseStream {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.header(name)
    }

    /// Comment lines (heartbeats) seen so far.
    pub fn comments(&self) -> usize {
        self.parser.comments
    }

    pub fn ended(&self) -> Option<End> {
        self.ended
    }

    fn absorb(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || self.ended.is_some() {
            return;
        }
        self.raw.extend_from_slice(bytes);
        let start = self.payload.len();
        if self.head.is_chunked() {
            let used = self
                .decoder
                .feed(bytes, &mut self.payload)
                .unwrap_or_else(|e| panic!("bad chunked framing: {e}; raw {:?}", self.raw));
            assert_eq!(
                used,
                bytes.len(),
                "bytes after the chunked terminator: {:?}",
                String::from_utf8_lossy(&bytes[used..])
            );
        } else {
            self.payload.extend_from_slice(bytes);
        }
        let items = self.parser.feed(&self.payload[start..]);
        self.pending.extend(items);
        if self.decoder.is_done() {
            self.ended = Some(End::Clean);
        }
    }

    /// The next event or comment within `within`.
    pub async fn next_item(&mut self, within: Duration) -> Result<Item, NoItem> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(item);
            }
            if let Some(end) = self.ended {
                return Err(NoItem::Ended(end));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut chunk = vec![0u8; 64 * 1024];
            match timeout(left, self.conn.sock.read(&mut chunk)).await {
                Err(_) => return Err(NoItem::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    let tail = self.parser.finish();
                    self.pending.extend(tail);
                    self.ended = Some(if self.decoder.is_done() {
                        End::Clean
                    } else {
                        End::Abrupt
                    });
                }
                Ok(Ok(n)) => self.absorb(&chunk[..n]),
            }
        }
    }

    /// The next event (skipping comments); panics on timeout or end.
    #[track_caller]
    pub fn next_event(
        &mut self,
        within: Duration,
    ) -> impl std::future::Future<Output = Event> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            loop {
                match self.next_item(within).await {
                    Ok(Item::Event(e)) => return e,
                    Ok(Item::Comment(_)) => continue,
                    Err(why) => panic!(
                        "{caller}: expected an event within {within:?}, got {why:?}; payload so far {:?}",
                        String::from_utf8_lossy(&self.payload)
                    ),
                }
            }
        }
    }

    /// Reads to the end of the body, returning how it ended and the items that came before.
    #[track_caller]
    pub fn end(
        &mut self,
        within: Duration,
    ) -> impl std::future::Future<Output = (End, Vec<Item>)> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let deadline = Instant::now() + within;
            let mut items = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.next_item(left).await {
                    Ok(item) => items.push(item),
                    Err(NoItem::Ended(end)) => return (end, items),
                    Err(NoItem::Timeout) => panic!(
                        "{caller}: stream did not end within {within:?}; payload {:?}",
                        String::from_utf8_lossy(&self.payload)
                    ),
                }
            }
        }
    }

    /// The `Last-Event-ID` a browser would reconnect with, from what was parsed so far.
    pub fn last_event_id(&self) -> &str {
        self.parser.last_event_id()
    }

    /// Closes the socket with an RST instead of a FIN.
    pub fn reset(self) {
        let _ = self.conn.sock.set_zero_linger();
        drop(self);
    }
}

/// The next `n` events (heartbeats skipped), each within [`SOON`].
pub async fn next_events(stream: &mut SseStream, n: usize) -> Vec<Event> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(stream.next_event(SOON).await);
    }
    out
}

/// The data of the next `n` events, each within [`SOON`].
pub async fn data_of_next(stream: &mut SseStream, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(stream.next_event(SOON).await.data);
    }
    out
}

/// Waits until `quiet` passes with nothing arriving (a heartbeat starts the wait again) or the
/// stream ends; panics on an event.
pub async fn no_event_within(stream: &mut SseStream, quiet: Duration) {
    loop {
        match stream.next_item(quiet).await {
            Ok(Item::Comment(_)) => continue,
            Ok(Item::Event(e)) => panic!("unexpected event {e:?}"),
            Err(_) => return,
        }
    }
}
