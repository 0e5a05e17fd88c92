//! Black-box test harness for `sse-gateway`: spawns the real binary, plays the backend, and
//! speaks HTTP/1.1 and SSE itself (never through the gateway's code).
//!
//! - [`Gateway`]: the child process on 127.0.0.1 with `PORT=0`; learns its ports from the
//!   start-up log lines, drains stderr in the background (lines kept for assertions), kills the
//!   child on drop.
//! - [`backend`]: the callback-side double.
//! - [`cluster`]: N gateways joined by a real Redis, and what the cluster tests share.
//! - [`http`]: a hand-written HTTP/1.1 client, including the streaming reader.
//! - [`redis`]: a real `redis-server` for the cluster tests (PROTOCOL §10).
//! - [`sse`]: an independent WHATWG event-stream parser (its unit tests are in `tests/harness.rs`).

// Each test binary uses a different part of the harness (and of its re-exports).
#![allow(dead_code, unused_imports)]

pub mod backend;
pub mod cluster;
pub mod http;
pub mod redis;
pub mod sse;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

pub use backend::{down_url, Backend, Callback, Reply};
pub use http::{
    data_of_next, last_event_id_header, next_events, no_event_within, End, HttpConn, NoItem,
    Response, SseStream,
};
pub use redis::Redis;
pub use sse::{Event, Item};

/// How long the gateway may take to print its listener lines.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// A generous bound for "soon" in the tests.
pub const SOON: Duration = Duration::from_secs(5);

/// Start-up settings for one gateway process.
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    env: BTreeMap<String, String>,
    nofile: Option<u64>,
}

impl GatewayBuilder {
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.insert(key.to_owned(), value.into());
        self
    }

    pub fn unset(mut self, key: &str) -> Self {
        self.env.remove(key);
        self
    }

    /// Runs the child with this `RLIMIT_NOFILE` (soft and hard).
    pub fn nofile_limit(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }

    pub fn callback(self, backend: &Backend) -> Self {
        self.env("CALLBACK_URL", backend.url())
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sse-gateway"));
        cmd.env_clear();
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        cmd.envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(limit) = self.nofile {
            let rlimit = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and
            // only reads the stack value moved into the closure.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// Spawns the gateway and waits for its listener lines.
    pub async fn spawn(self) -> Gateway {
        let mut child = self.command().spawn().expect("spawn sse-gateway");
        let pid = child.id().expect("pid");
        let logs = Logs::drain(child.stderr.take().expect("stderr"), pid);
        let public = logs
            .wait_for(|l| l.contains("public listener on http://"), START_TIMEOUT)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "gateway printed no public listener line; stderr: {:#?}",
                    logs.lines()
                )
            });
        let addr = listener_addr(&public);
        let internal = if self.env.contains_key("INTERNAL_PORT") {
            let line = logs
                .wait_for(
                    |l| l.contains("internal listener on http://"),
                    START_TIMEOUT,
                )
                .await
                .unwrap_or_else(|| {
                    panic!(
                        "gateway printed no internal listener line; stderr: {:#?}",
                        logs.lines()
                    )
                });
            Some(listener_addr(&line))
        } else {
            None
        };
        Gateway {
            child,
            pid,
            addr,
            internal,
            secret: self.env.get("INTERNAL_SECRET").cloned(),
            logs,
        }
    }

    /// Runs a gateway that is expected to stop by itself; returns its exit code and stderr.
    pub async fn run_to_exit(self, within: Duration) -> (Option<i32>, Vec<String>) {
        let mut child = self.command().spawn().expect("spawn sse-gateway");
        let pid = child.id().expect("pid");
        let logs = Logs::drain(child.stderr.take().expect("stderr"), pid);
        let status = timeout(within, child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "gateway with {:?} did not exit within {within:?}; stderr {:#?}",
                    self.env,
                    logs.lines()
                )
            })
            .expect("wait");
        logs.wait_eof(SOON).await;
        (status.code(), logs.lines())
    }

    /// Runs a gateway with `var=value` that must refuse to start: `None` if it exited 2 with a
    /// message naming `var` and never listened, else what it did instead.
    pub async fn refusal_problem(self, var: &str, value: &str) -> Option<String> {
        let (code, lines) = self
            .env(var, value)
            .run_to_exit(Duration::from_secs(10))
            .await;
        let named = lines.iter().any(|l| l.contains(var));
        let listening = lines.iter().any(|l| l.contains("listener on"));
        (code != Some(2) || !named || listening).then(|| {
            format!(
                "{var}={value:?}: exit {code:?}, names it: {named}, listened: {listening}; stderr {lines:?}"
            )
        })
    }
}

fn listener_addr(line: &str) -> SocketAddr {
    let after = line.split("http://").nth(1).expect("address after http://");
    let addr = after.split_whitespace().next().unwrap_or("");
    addr.trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("cannot parse listener address from {line:?}: {e}"))
}

/// A running gateway; the child is killed when this is dropped.
pub struct Gateway {
    child: Child,
    pub pid: u32,
    /// The public listener.
    pub addr: SocketAddr,
    /// The internal listener, when `INTERNAL_PORT` was set.
    pub internal: Option<SocketAddr>,
    secret: Option<String>,
    pub logs: Logs,
}

impl Gateway {
    /// Defaults for tests: 127.0.0.1, any free port, info logs.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            env: BTreeMap::new(),
            nofile: None,
        }
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
    }

    /// A gateway whose callbacks go to `backend`.
    pub async fn start(backend: &Backend) -> Gateway {
        Gateway::builder().callback(backend).spawn().await
    }

    /// Where `/internal/*` and `/metrics` are served.
    pub fn control_addr(&self) -> SocketAddr {
        self.internal.unwrap_or(self.addr)
    }

    /// `POST /internal/send` with `body` (and the bearer secret, when one is configured).
    pub async fn send(&self, body: &Value) -> Response {
        self.post("/internal/send", body).await
    }

    pub async fn send_raw(&self, bytes: &[u8]) -> Response {
        self.post_raw("/internal/send", bytes).await
    }

    /// `POST path` with a JSON body on the control listener (and the bearer secret, when one is
    /// configured).
    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.post_raw(path, &serde_json::to_vec(body).unwrap())
            .await
    }

    pub async fn post_raw(&self, path: &str, bytes: &[u8]) -> Response {
        let auth = self.secret.as_ref().map(|s| format!("Bearer {s}"));
        let mut headers: Vec<(&str, &[u8])> = vec![("Content-Type", b"application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_bytes()));
        }
        http::request(self.control_addr(), "POST", path, &headers, Some(bytes)).await
    }

    /// Sends one event and asserts the 200 answer.
    #[track_caller]
    pub fn send_ok<'a>(&'a self, body: &'a Value) -> impl std::future::Future<Output = ()> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let r = self.send(body).await;
            assert_eq!(
                r.status(),
                200,
                "{caller}: send {body} answered {:?}",
                r.text()
            );
            assert_eq!(r.json(), serde_json::json!({"status": "ok"}), "{caller}");
        }
    }

    /// Opens a stream that the backend accepts; returns it with its token (from the connect
    /// callback, which must be the next callback).
    #[track_caller]
    pub fn open<'a>(
        &'a self,
        backend: &'a mut Backend,
        target: &'a str,
    ) -> impl std::future::Future<Output = (SseStream, String)> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let stream = match http::open_stream(self.addr, target).await {
                Ok(s) => s,
                Err(r) => panic!(
                    "{caller}: GET {target} refused: {} {}",
                    r.status(),
                    r.text()
                ),
            };
            let cb = backend.next_connect().await;
            assert_eq!(cb.url(), target, "{caller}");
            (stream, cb.token().to_owned())
        }
    }

    /// `GET /metrics` on the control listener, parsed.
    pub async fn metrics(&self) -> Metrics {
        let r = http::get(self.control_addr(), "/metrics").await;
        assert_eq!(r.status(), 200, "/metrics: {}", r.text());
        Metrics::parse(&r.text())
    }

    /// Polls `/metrics` until `pred` holds (counters are updated asynchronously to the bytes a
    /// client sees); panics with the last scrape after `within`.
    pub async fn wait_metrics(&self, within: Duration, pred: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + within;
        loop {
            let m = self.metrics().await;
            if pred(&m) {
                return m;
            }
            if Instant::now() >= deadline {
                panic!(
                    "metrics condition not met within {within:?}; last scrape:\n{}",
                    m.text
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid);
    }

    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "gateway did not exit within {within:?}; stderr {:#?}",
                self.logs.lines()
            ),
        }
    }

    /// CPU time (user + system) the gateway has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).expect("stat");
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Resident set size of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The gateway's stderr lines, collected by a background task.
#[derive(Clone)]
pub struct Logs {
    state: Arc<Mutex<(Vec<String>, bool)>>,
    tick: watch::Receiver<u64>,
}

impl Logs {
    fn drain(stderr: ChildStderr, pid: u32) -> Logs {
        let state = Arc::new(Mutex::new((Vec::new(), false)));
        let (tx, rx) = watch::channel(0u64);
        let st = state.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).await.unwrap_or(0);
                if n == 0 {
                    st.lock().unwrap().1 = true;
                    tx.send_modify(|t| *t += 1);
                    return;
                }
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned();
                eprintln!("[gateway {pid}] {text}");
                st.lock().unwrap().0.push(text);
                tx.send_modify(|t| *t += 1);
            }
        });
        Logs { state, tick: rx }
    }

    pub fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().0.clone()
    }

    /// Waits for a line matching `pred` (already printed or to come).
    pub async fn wait_for(&self, pred: impl Fn(&str) -> bool, within: Duration) -> Option<String> {
        self.wait_for_from(0, pred, within).await
    }

    /// Waits for a line at index `from` or later matching `pred`.
    pub async fn wait_for_from(
        &self,
        from: usize,
        pred: impl Fn(&str) -> bool,
        within: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + within;
        let mut tick = self.tick.clone();
        loop {
            tick.borrow_and_update();
            {
                let st = self.state.lock().unwrap();
                if let Some(l) = st.0.iter().skip(from).find(|l| pred(l)) {
                    return Some(l.clone());
                }
                if st.1 {
                    return None;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if timeout(left, tick.changed()).await.is_err() {
                return None;
            }
        }
    }

    pub async fn wait_eof(&self, within: Duration) {
        let mut tick = self.tick.clone();
        let deadline = Instant::now() + within;
        loop {
            tick.borrow_and_update();
            if self.state.lock().unwrap().1 {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if timeout(left, tick.changed()).await.is_err() {
                panic!("stderr not closed within {within:?}");
            }
        }
    }
}

/// One sample of the Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` scrape.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, rest) = match line.find('{') {
                Some(_) => {
                    let close = line
                        .rfind('}')
                        .unwrap_or_else(|| panic!("bad line {line:?}"));
                    (&line[..close + 1], &line[close + 1..])
                }
                None => {
                    let sp = line
                        .find(' ')
                        .unwrap_or_else(|| panic!("bad line {line:?}"));
                    (&line[..sp], &line[sp..])
                }
            };
            let value: f64 = rest
                .split_whitespace()
                .next()
                .and_then(|v| match v {
                    "+Inf" => Some(f64::INFINITY),
                    _ => v.parse().ok(),
                })
                .unwrap_or_else(|| panic!("bad value in {line:?}"));
            let (name, labels) = match series.find('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some(open) => (
                    series[..open].to_owned(),
                    parse_labels(&series[open + 1..series.len() - 1]),
                ),
            };
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Metrics {
            text: text.to_owned(),
            samples,
        }
    }

    /// The value of the first sample named `name` whose labels include `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// Like [`Metrics::get`], 0 when absent (a labelled counter may appear on first use).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let eq = rest.find('=').unwrap_or_else(|| panic!("bad labels {s:?}"));
        let key = rest[..eq].trim().to_owned();
        let after = rest[eq + 1..].trim_start();
        assert!(after.starts_with('"'), "bad labels {s:?}");
        let mut value = String::new();
        let mut chars = after[1..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = Some(i + 2);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.unwrap_or_else(|| panic!("unterminated label in {s:?}"));
        out.insert(key, value);
        rest = after[end..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    out
}

/// A random-looking UUID v4 in lower-case hyphenated form.
pub fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
}

/// Checks the `<RFC 3339 time> [LEVEL] message` shape of one log line.
pub fn is_log_line(line: &str) -> bool {
    let Some((time, rest)) = line.split_once(' ') else {
        return false;
    };
    let Some(rest) = rest.strip_prefix('[') else {
        return false;
    };
    let Some((level, msg)) = rest.split_once("] ") else {
        return false;
    };
    matches!(level, "ERROR" | "WARN" | "INFO" | "DEBUG") && !msg.is_empty() && is_rfc3339(time)
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn is_rfc3339(t: &str) -> bool {
    let b = t.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    if !(b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}
