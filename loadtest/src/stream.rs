//! SSE streams, cheap enough to hold 18,000 of them on one thread: a raw TCP socket bound to a source
//! address in 127.0.0.2–127.0.0.254 (so ephemeral ports never run out), a hand-written GET, and the
//! incremental chunked + SSE parsers from `http`. A stream owns no read buffer: reads go into one
//! per-thread buffer and are parsed before the next `.await`, so an idle stream costs its socket, its
//! task and a `Slot` (about 200 bytes), nothing more.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use crate::backend::Backend;
use crate::hist::Histogram;
use crate::http::{parse_head, parse_payload, ChunkDecoder, Head, SseItem, SseParser};

/// Source addresses 127.0.0.2 ..= 127.0.0.254: 253 of them, each with its own ~28k ephemeral ports.
pub const MAX_SOURCES: u32 = 253;
/// One read buffer per thread, shared by every stream on it.
const READ_BUF: usize = 64 * 1024;
/// A response head longer than this is refused.
const MAX_HEAD: usize = 16 * 1024;

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUF]);
}

pub const PENDING: u8 = 0;
pub const OPEN: u8 = 1;
pub const FAILED: u8 = 2;
/// The gateway ended the stream (clean last chunk, EOF or reset).
pub const ENDED: u8 = 3;

/// One stream's state, shared between its task, the senders and the reports.
#[derive(Default)]
pub struct Slot {
    /// The node (index into `StreamConfig::targets`) the stream is open on; 0 on one gateway.
    pub node: usize,
    pub token: OnceLock<String>,
    pub state: AtomicU8,
    pub status: AtomicU16,
    pub received: AtomicU64,
    pub last_seq: AtomicU64,
    pub out_of_order: AtomicU64,
    pub gaps: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Sends the gateway answered 200 for this token (set by senders).
    pub expected: AtomicU64,
    /// The next sequence number a sender puts in this token's payload (starts at 1).
    pub next_seq: AtomicU64,
    /// The last event id this stream dispatched (`StreamConfig::track_ids` only): what a browser
    /// would reconnect with as `Last-Event-ID`.
    pub last_id: Mutex<Vec<u8>>,
    /// Open the stream with this `Last-Event-ID` header (set before the stream starts).
    pub resume_from: OnceLock<String>,
    /// `gateway.gap` events this stream got (PROTOCOL §11).
    pub gap_events: AtomicU64,
}

/// Everything all streams report into.
#[derive(Default)]
pub struct Sink {
    pub latency: Mutex<Histogram>,
    pub events: AtomicU64,
    pub heartbeats: AtomicU64,
    pub unparsed: AtomicU64,
    pub out_of_order: AtomicU64,
    pub gaps: AtomicU64,
    pub established: AtomicU64,
    pub failed: AtomicU64,
    pub ended: AtomicU64,
    /// 200 answers whose `c=` the backend never saw in a connect callback.
    pub untracked: AtomicU64,
    /// `broadcast`: the round in flight, its deliveries and its last delivery time.
    pub round: AtomicU64,
    pub round_delivered: AtomicU64,
    pub round_last_us: AtomicU64,
    /// Failures and stream endings by kind, e.g. `status 503`, `connect: ConnectionRefused`.
    pub errors: Mutex<HashMap<String, u64>>,
    /// Events that carried an `id:` (with history on, every published event does, PROTOCOL §11).
    pub with_id: AtomicU64,
    /// `gateway.gap` events (not counted as events).
    pub gap_events: AtomicU64,
    /// Time from connect to the response head of every stream a `Pool` opened.
    pub heads: Mutex<Histogram>,
    /// `resume`: a stream whose sequence reaches `resume_target` records the time since
    /// `resume_t0_us` in `resumed_at` (once: sequences only go up). 0: off.
    pub resume_target: AtomicU64,
    pub resume_t0_us: AtomicU64,
    pub resumed_at: Mutex<Histogram>,
}

impl Sink {
    pub fn error(&self, kind: impl Into<String>) {
        *self.errors.lock().unwrap().entry(kind.into()).or_default() += 1;
    }

    pub fn errors_sorted(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .errors
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort();
        v
    }

    fn on_event(&self, slot: &Slot, data: &[u8]) {
        // `broadcast --probe-rate` events only measure request latency; they are not deliveries.
        if data.starts_with(PROBE_DATA.as_bytes()) {
            return;
        }
        // `event: gateway.gap` (PROTOCOL §11): its data is `{"last_event_id":...}`.
        if data.starts_with(GAP_DATA.as_bytes()) {
            slot.gap_events.fetch_add(1, Ordering::Relaxed);
            self.gap_events.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.events.fetch_add(1, Ordering::Relaxed);
        slot.received.fetch_add(1, Ordering::Relaxed);
        let Some((seq, ts)) = parse_payload(data) else {
            self.unparsed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let now = crate::sys::now_us();
        self.latency.lock().unwrap().record(now.saturating_sub(ts));
        let last = slot.last_seq.load(Ordering::Relaxed);
        if seq <= last {
            slot.out_of_order.fetch_add(1, Ordering::Relaxed);
            self.out_of_order.fetch_add(1, Ordering::Relaxed);
        } else {
            if seq > last + 1 {
                slot.gaps.fetch_add(seq - last - 1, Ordering::Relaxed);
                self.gaps.fetch_add(seq - last - 1, Ordering::Relaxed);
            }
            slot.last_seq.store(seq, Ordering::Relaxed);
            let target = self.resume_target.load(Ordering::Relaxed);
            if target > 0 && last < target && seq >= target {
                let t0 = self.resume_t0_us.load(Ordering::Relaxed);
                self.resumed_at
                    .lock()
                    .unwrap()
                    .record(now.saturating_sub(t0));
            }
        }
        if seq == self.round.load(Ordering::Relaxed) {
            self.round_delivered.fetch_add(1, Ordering::Relaxed);
            self.round_last_us.fetch_max(now, Ordering::Relaxed);
        }
    }
}

/// The data of `broadcast --probe-rate` events, which the sink ignores.
pub const PROBE_DATA: &str = "probe";
/// How the data of a `gateway.gap` event starts (PROTOCOL §11); no load payload starts so.
pub const GAP_DATA: &str = r#"{"last_event_id":"#;

/// Why opening a stream failed; `Display` is the key failures are counted under.
#[derive(Debug)]
pub enum OpenError {
    Connect(io::ErrorKind),
    Io(io::ErrorKind),
    Status(u16),
    Closed,
    BadHead(String),
    Timeout,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Connect(k) => write!(f, "connect: {k:?}"),
            OpenError::Io(k) => write!(f, "io before headers: {k:?}"),
            OpenError::Status(s) => write!(f, "status {s}"),
            OpenError::Closed => write!(f, "closed before headers"),
            OpenError::BadHead(e) => write!(f, "{e}"),
            OpenError::Timeout => write!(f, "no headers in time"),
        }
    }
}

/// The source address for the `i`-th connection, spread over `sources` addresses.
pub fn source_for(i: u64, sources: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        0,
        0,
        2 + (i % sources.clamp(1, MAX_SOURCES) as u64) as u8,
    )
}

/// Connects from `src` (any port) to `dst`. `IP_BIND_ADDRESS_NO_PORT` defers the port choice to
/// `connect`, so a port is shared across destinations instead of reserved at bind time.
pub async fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
    let s = sock.connect(dst).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// An open stream: its socket, head, and the body bytes that came with the head.
pub struct Opened {
    pub sock: TcpStream,
    pub head: Head,
    pub leftover: Vec<u8>,
    pub time_to_headers: Duration,
}

/// Connects, sends `GET <path>?c=<client>` and reads the response head, all within `timeout`.
pub async fn open(
    client: u64,
    src: Ipv4Addr,
    dst: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Opened, OpenError> {
    open_with(client, src, dst, path, timeout, None).await
}

/// `open`, with a `Last-Event-ID` header when `last_event_id` is given (PROTOCOL §11 resume).
pub async fn open_with(
    client: u64,
    src: Ipv4Addr,
    dst: SocketAddr,
    path: &str,
    timeout: Duration,
    last_event_id: Option<&str>,
) -> Result<Opened, OpenError> {
    let t0 = Instant::now();
    let fut = async {
        let mut sock = connect_from(src, dst)
            .await
            .map_err(|e| OpenError::Connect(e.kind()))?;
        let path = path.replace("{c}", &client.to_string());
        let resume = last_event_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
        let req = format!(
            "GET {path}?c={client} HTTP/1.1\r\nHost: {dst}\r\nAccept: text/event-stream\r\nUser-Agent: sse-load\r\n{resume}\r\n"
        );
        sock.write_all(req.as_bytes())
            .await
            .map_err(|e| OpenError::Io(e.kind()))?;
        let mut head_buf: Vec<u8> = Vec::with_capacity(512);
        loop {
            sock.readable().await.map_err(|e| OpenError::Io(e.kind()))?;
            let mut chunk = [0u8; 1024];
            match sock.try_read(&mut chunk) {
                Ok(0) => return Err(OpenError::Closed),
                Ok(n) => head_buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(OpenError::Io(e.kind())),
            }
            match parse_head(&head_buf) {
                Ok(Some(head)) => {
                    let leftover = head_buf.split_off(head.len);
                    return Ok((sock, head, leftover));
                }
                Ok(None) if head_buf.len() > MAX_HEAD => {
                    return Err(OpenError::BadHead("response head too long".into()))
                }
                Ok(None) => {}
                Err(e) => return Err(OpenError::BadHead(e)),
            }
        }
    };
    let (sock, head, leftover) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| OpenError::Timeout)??;
    if head.status != 200 {
        return Err(OpenError::Status(head.status));
    }
    Ok(Opened {
        sock,
        head,
        leftover,
        time_to_headers: t0.elapsed(),
    })
}

/// How a held stream ended.
enum End {
    CleanLastChunk,
    Eof,
    Reset(io::ErrorKind),
    Protocol(String),
}

/// Reads an open stream until it ends, counting events and heartbeats into `slot` and `sink`
/// (and keeping the last event id in `slot` with `track_ids`).
async fn pump(opened: Opened, slot: &Slot, sink: &Sink, track_ids: bool) -> End {
    let Opened {
        sock,
        head,
        leftover,
        ..
    } = opened;
    let mut chunks = head.chunked.then(ChunkDecoder::default);
    let mut sse = SseParser::default();
    let mut feed = |bytes: &[u8]| -> Result<bool, String> {
        let mut on = |item: SseItem<'_>| match item {
            SseItem::Event(data) => sink.on_event(slot, data),
            SseItem::Id { id, data } => {
                if data {
                    sink.with_id.fetch_add(1, Ordering::Relaxed);
                }
                if track_ids {
                    let mut last = slot.last_id.lock().unwrap();
                    last.clear();
                    last.extend_from_slice(id);
                }
            }
            SseItem::Comment(c) => {
                if c.trim_ascii() == b"heartbeat" {
                    slot.heartbeats.fetch_add(1, Ordering::Relaxed);
                    sink.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        match chunks.as_mut() {
            Some(dec) => {
                let mut err = None;
                dec.feed(bytes, |payload| {
                    if err.is_none() {
                        err = sse.feed(payload, &mut on).err();
                    }
                })?;
                if let Some(e) = err {
                    return Err(e);
                }
                Ok(dec.done())
            }
            None => sse.feed(bytes, &mut on).map(|_| false),
        }
    };
    match feed(&leftover) {
        Ok(true) => return End::CleanLastChunk,
        Ok(false) => {}
        Err(e) => return End::Protocol(e),
    }
    drop(leftover);
    loop {
        if let Err(e) = sock.readable().await {
            return End::Reset(e.kind());
        }
        let step = BUF.with(|b| {
            let mut b = b.borrow_mut();
            match sock.try_read(&mut b) {
                Ok(0) => Some(End::Eof),
                Ok(n) => match feed(&b[..n]) {
                    Ok(true) => Some(End::CleanLastChunk),
                    Ok(false) => None,
                    Err(e) => Some(End::Protocol(e)),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => Some(End::Reset(e.kind())),
            }
        });
        if let Some(end) = step {
            return end;
        }
    }
}

/// Where streams go and how they are opened.
#[derive(Clone)]
pub struct StreamConfig {
    /// The public listeners of the nodes: stream i opens on `targets[i % len]` (one gateway: one).
    pub targets: Vec<SocketAddr>,
    pub path: String,
    pub sources: u32,
    pub head_timeout: Duration,
    /// Keep each stream's last event id in its `Slot::last_id` (a copy per event).
    pub track_ids: bool,
}

/// A growing set of held streams.
pub struct Pool {
    pub slots: Vec<Arc<Slot>>,
    tasks: Vec<AbortHandle>,
    pub sink: Arc<Sink>,
    backend: Arc<Backend>,
    cfg: StreamConfig,
    /// Opens in flight (connect sent, head not yet read): keeps the accept backlog from overflowing.
    gate: Arc<Semaphore>,
}

/// The outcome of `Pool::grow`.
#[derive(Debug, Clone, Copy)]
pub struct GrowResult {
    pub established: u64,
    pub failed: u64,
    pub pending: u64,
    pub elapsed: Duration,
    pub deadline_missed: bool,
}

impl Pool {
    pub fn new(
        sink: Arc<Sink>,
        backend: Arc<Backend>,
        cfg: StreamConfig,
        concurrency: usize,
    ) -> Self {
        Pool {
            slots: Vec::new(),
            tasks: Vec::new(),
            sink,
            backend,
            cfg,
            gate: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Opens streams until `total` exist, then waits until each one is established or failed, or
    /// `deadline` passes.
    pub async fn grow(&mut self, total: usize, deadline: Duration) -> GrowResult {
        self.grow_with(total, deadline, Duration::ZERO, |_, _| {})
            .await
    }

    /// `grow`, with the opens spread evenly over `spread` (the k-th of m starts at `spread * k /
    /// m`, still at most `concurrency` in flight), and `prepare(i, slot)` called on each new slot
    /// before its stream starts (to set `resume_from` or a starting `last_seq`).
    pub async fn grow_with(
        &mut self,
        total: usize,
        deadline: Duration,
        spread: Duration,
        prepare: impl Fn(usize, &Slot),
    ) -> GrowResult {
        let t0 = Instant::now();
        let first = self.slots.len();
        let open_deadline = t0 + deadline;
        let count = total.saturating_sub(first).max(1) as u32;
        for i in first..total {
            if !spread.is_zero() {
                let at = t0 + spread * (i - first) as u32 / count;
                tokio::time::sleep_until(at.into()).await;
            }
            let permit = match tokio::time::timeout_at(
                open_deadline.into(),
                self.gate.clone().acquire_owned(),
            )
            .await
            {
                Ok(Ok(p)) => p,
                _ => break,
            };
            let slot = Arc::new(Slot {
                node: i % self.cfg.targets.len(),
                ..Slot::default()
            });
            slot.next_seq.store(1, Ordering::Relaxed);
            prepare(i, &slot);
            self.slots.push(slot.clone());
            let task = tokio::spawn(hold_stream(
                i as u64,
                slot,
                self.sink.clone(),
                self.backend.clone(),
                self.cfg.clone(),
                permit,
            ));
            self.tasks.push(task.abort_handle());
        }
        let started = &self.slots[first..];
        loop {
            let (mut est, mut failed) = (0, 0);
            for s in started {
                match s.state.load(Ordering::Relaxed) {
                    PENDING => {}
                    FAILED => failed += 1,
                    _ => est += 1,
                }
            }
            let pending = (total - first) as u64 - est - failed;
            let missed = Instant::now() >= open_deadline;
            if pending == 0 || missed {
                return GrowResult {
                    established: est,
                    failed,
                    pending,
                    elapsed: t0.elapsed(),
                    deadline_missed: pending > 0,
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Streams currently open (established and not ended).
    pub fn open_count(&self) -> u64 {
        self.slots
            .iter()
            .filter(|s| s.state.load(Ordering::Relaxed) == OPEN)
            .count() as u64
    }

    /// Indices of the open streams whose token is known.
    pub fn open_with_token(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| {
                let s = &self.slots[i];
                s.state.load(Ordering::Relaxed) == OPEN && s.token.get().is_some()
            })
            .collect()
    }

    /// Closes every stream from this side (the gateway should see `client_closed`).
    pub fn close_all(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close_all();
    }
}

async fn hold_stream(
    client: u64,
    slot: Arc<Slot>,
    sink: Arc<Sink>,
    backend: Arc<Backend>,
    cfg: StreamConfig,
    permit: OwnedSemaphorePermit,
) {
    let src = source_for(client, cfg.sources);
    let dst = cfg.targets[slot.node];
    let resume = slot.resume_from.get().map(String::as_str);
    let opened = open_with(client, src, dst, &cfg.path, cfg.head_timeout, resume).await;
    drop(permit);
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            if let OpenError::Status(s) = e {
                slot.status.store(s, Ordering::Relaxed);
            }
            slot.state.store(FAILED, Ordering::Relaxed);
            sink.failed.fetch_add(1, Ordering::Relaxed);
            sink.error(e.to_string());
            return;
        }
    };
    slot.status.store(200, Ordering::Relaxed);
    sink.heads
        .lock()
        .unwrap()
        .record(opened.time_to_headers.as_micros() as u64);
    if !opened.head.event_stream {
        sink.error("200 without content-type text/event-stream");
    }
    match backend.token_for(client) {
        Some(t) => {
            let _ = slot.token.set(t);
        }
        None => {
            sink.untracked.fetch_add(1, Ordering::Relaxed);
            sink.error("200 but no connect callback seen for it");
        }
    }
    slot.state.store(OPEN, Ordering::Relaxed);
    sink.established.fetch_add(1, Ordering::Relaxed);
    let end = pump(opened, &slot, &sink, cfg.track_ids).await;
    slot.state.store(ENDED, Ordering::Relaxed);
    sink.ended.fetch_add(1, Ordering::Relaxed);
    sink.error(match end {
        End::CleanLastChunk => "stream ended by gateway (last chunk)".to_owned(),
        End::Eof => "stream ended by gateway (EOF without last chunk)".to_owned(),
        End::Reset(k) => format!("stream ended by gateway ({k:?})"),
        End::Protocol(e) => format!("stream protocol error: {e}"),
    });
}
