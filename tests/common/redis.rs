//! A real Redis for the cluster tests: Debian's `redis-server` on a free 127.0.0.1 port, with no
//! persistence, in its own temp dir. Readiness is checked by speaking RESP over a raw `TcpStream`
//! (no Redis client crate in the tests). The process can be killed and restarted on the same port,
//! or paused (SIGSTOP) and resumed (SIGCONT) to look like a silently dead connection; it is killed
//! when dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{timeout, Instant};

/// Where Debian's package puts the server (`.ci/run` installs it when missing); otherwise the
/// first `redis-server` on PATH.
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
/// How long a fresh or restarted server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Redis {
    server: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Redis {
    /// Starts `redis-server` on a port that was free a moment ago and waits for PONG.
    pub async fn start() -> Redis {
        Redis::start_with(&[]).await
    }

    /// As [`Redis::start`], with extra `redis-server` arguments (e.g. `--requirepass`), also used
    /// by [`Redis::restart`].
    pub async fn start_with(extra: &[&str]) -> Redis {
        let server = server_path().unwrap_or_else(|| {
            panic!(
                "redis-server not found ({REDIS_SERVER} nor on PATH): the cluster tests run a \
                 real Redis; install it with `apt-get install redis-server` (or run `bash .ci/run`)"
            )
        });
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("sse-gateway-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        let mut redis = Redis {
            server,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            dir,
        };
        redis.spawn().await;
        redis
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let log = self.dir.join("redis.log");
        let child = Command::new(&self.server)
            .current_dir(&self.dir)
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.addr.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--loglevel", "notice"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.server.display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.ping(Duration::from_millis(200)).await {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!(
                    "redis-server on {} exited ({status}) before answering PING; log:\n{}",
                    self.addr,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "redis-server on {} did not answer PING within {START_TIMEOUT:?}; log:\n{}",
                    self.addr,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// True when the server answers `PING` within `within`, with `+PONG` (or `-NOAUTH` when it
    /// wants a password); a paused or dead server does not.
    pub async fn ping(&self, within: Duration) -> bool {
        match timeout(within, command(self.addr, &["PING"])).await {
            Ok(Ok(Resp::Simple(pong))) => pong == "PONG",
            Ok(Ok(Resp::Error(e))) => e.starts_with("NOAUTH"),
            _ => false,
        }
    }

    /// Sends one command and returns its reply in [`Resp::short`] form (`+OK`, `:3`, the bulk
    /// string, `*2`, ...).
    pub async fn command(&self, args: &[&str]) -> String {
        self.query(args).await.short()
    }

    /// Sends one command on a fresh connection and returns the whole reply.
    pub async fn query(&self, args: &[&str]) -> Resp {
        timeout(Duration::from_secs(5), command(self.addr, args))
            .await
            .unwrap_or_else(|_| panic!("redis {args:?}: no reply within 5 s"))
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Sends `SELECT db` and then one command, on one fresh connection; returns the command's
    /// reply (for a deployment that was pointed at database `db`).
    pub async fn query_in(&self, db: u32, args: &[&str]) -> Resp {
        let db = db.to_string();
        let replies = timeout(
            Duration::from_secs(5),
            commands(self.addr, &[&["SELECT", db.as_str()], args]),
        )
        .await
        .unwrap_or_else(|_| panic!("redis SELECT {db}; {args:?}: no reply within 5 s"))
        .unwrap_or_else(|e| panic!("redis SELECT {db}; {args:?}: {e}"));
        let [select, reply]: [Resp; 2] = replies.try_into().expect("two replies");
        assert_eq!(select, Resp::Simple("OK".into()), "SELECT {db}");
        reply
    }

    /// The directory the server runs in (its `--dir`), where an RDB or AOF file would be written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names of the files in [`Redis::dir`] that a restarted server would load data from (an RDB
    /// snapshot, an append-only file or directory); empty with this helper's settings.
    pub fn persisted_files(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| {
                name.ends_with(".rdb") || name.ends_with(".aof") || name.contains("appendonly")
            })
            .collect()
    }

    /// SIGKILL, then waits for the process to be gone: the port is closed when this returns.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("redis-server is not running");
        child.start_kill().expect("SIGKILL redis-server");
        timeout(Duration::from_secs(5), child.wait())
            .await
            .expect("redis-server did not die within 5 s of SIGKILL")
            .expect("wait redis-server");
    }

    /// Starts a new server on the same port (after [`Redis::kill`]), empty, and waits for PONG.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.kill().await;
        }
        self.spawn().await;
    }

    /// SIGSTOP: the socket stays open and connections are accepted by the kernel, but nothing
    /// is answered, as after a failover that left a half-open connection.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Redis::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.pid().expect("redis-server is not running");
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SIGKILL also ends a stopped process.
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn server_path() -> Option<PathBuf> {
    let debian = PathBuf::from(REDIS_SERVER);
    if debian.is_file() {
        return Some(debian);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
}

/// A port that was free on 127.0.0.1 a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None`: the null bulk string.
    Bulk(Option<String>),
    /// `None`: the null array.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The short form tests compare with: `+OK`, `-ERR ...`, `:3`, the bulk string itself (or
    /// `$-1`), `*<n>` (or `*-1`).
    pub fn short(&self) -> String {
        match self {
            Resp::Simple(s) => format!("+{s}"),
            Resp::Error(s) => format!("-{s}"),
            Resp::Int(n) => format!(":{n}"),
            Resp::Bulk(Some(s)) => s.clone(),
            Resp::Bulk(None) => "$-1".to_owned(),
            Resp::Array(Some(items)) => format!("*{}", items.len()),
            Resp::Array(None) => "*-1".to_owned(),
        }
    }
}

/// Parses one reply at the start of `buf`: `Ok(None)` while incomplete, else the reply and the
/// bytes it took.
fn parse_reply(buf: &[u8]) -> std::io::Result<Option<(Resp, usize)>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = line.get(1..).unwrap_or("");
    let after = end + 2;
    let number = || rest.parse::<i64>().map_err(|_| bad(&line));
    Ok(Some(match line.as_bytes().first() {
        Some(b'+') => (Resp::Simple(rest.to_owned()), after),
        Some(b'-') => (Resp::Error(rest.to_owned()), after),
        Some(b':') => (Resp::Int(number()?), after),
        Some(b'$') => {
            let len = number()?;
            if len < 0 {
                (Resp::Bulk(None), after)
            } else {
                let stop = after + len as usize;
                if buf.len() < stop + 2 {
                    return Ok(None);
                }
                let text = String::from_utf8_lossy(&buf[after..stop]).into_owned();
                (Resp::Bulk(Some(text)), stop + 2)
            }
        }
        Some(b'*') => {
            let n = number()?;
            if n < 0 {
                (Resp::Array(None), after)
            } else {
                let mut items = Vec::with_capacity(n as usize);
                let mut at = after;
                for _ in 0..n {
                    let Some((item, used)) = parse_reply(&buf[at..])? else {
                        return Ok(None);
                    };
                    items.push(item);
                    at += used;
                }
                (Resp::Array(Some(items)), at)
            }
        }
        _ => return Err(bad(&line)),
    }))
}

/// One RESP command on a fresh connection; returns the whole reply.
async fn command(addr: SocketAddr, args: &[&str]) -> std::io::Result<Resp> {
    let mut sock = TcpStream::connect(addr).await?;
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    sock.write_all(&req).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((reply, _)) = parse_reply(&buf)? {
            return Ok(reply);
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "redis closed the connection; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Several RESP commands on one fresh connection, written together; returns their replies in
/// order.
async fn commands(addr: SocketAddr, cmds: &[&[&str]]) -> std::io::Result<Vec<Resp>> {
    let mut sock = TcpStream::connect(addr).await?;
    let mut req = Vec::new();
    for args in cmds {
        req.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in *args {
            req.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
    }
    sock.write_all(&req).await?;
    let mut replies = Vec::with_capacity(cmds.len());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while replies.len() < cmds.len() {
        if let Some((reply, used)) = parse_reply(&buf)? {
            replies.push(reply);
            buf.drain(..used);
            continue;
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "redis closed the connection after {} replies; got {:?}",
                    replies.len(),
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(replies)
}

fn bad(line: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("bad RESP line {line:?}"),
    )
}
