//! The Redis server of `--cluster N`: Debian's `redis-server` on a free loopback port, no
//! persistence (`--save "" --appendonly no`), its working directory and log in a fresh temp dir,
//! pinned with the gateways. Stopped with SIGTERM (SIGKILL after a grace) at the end of the run,
//! killed if this value is dropped without `stop` (an error path), and by the kernel if sse-load
//! itself dies (`PR_SET_PDEATHSIG`, see `sys::child_setup`).

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long a fresh redis-server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports tried when another process takes the free port between our probe and Redis's bind.
const START_ATTEMPTS: usize = 3;

pub struct Redis {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    child: Option<Child>,
    dir: PathBuf,
}

impl Redis {
    /// Starts `bin` on a free 127.0.0.1 port and waits until it answers PING.
    pub async fn start(bin: &str, cpu: Option<usize>) -> Result<Redis, String> {
        let dir = temp_dir()?;
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port().map_err(|e| format!("find a free port: {e}"))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log = std::fs::File::create(dir.join("redis.log"))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            let mut cmd = Command::new(bin);
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no", "--logfile", ""])
                .arg("--dir")
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::from(
                    log.try_clone().map_err(|e| format!("redis.log: {e}"))?,
                ))
                .stderr(Stdio::from(log))
                .kill_on_drop(true);
            // SAFETY: `child_setup` makes only async-signal-safe calls.
            unsafe {
                cmd.pre_exec(move || crate::sys::child_setup(cpu));
            }
            let child = cmd.spawn().map_err(|e| format!("spawn {bin}: {e}"))?;
            let mut redis = Redis {
                addr,
                pid: child.id(),
                child: Some(child),
                dir: dir.clone(),
            };
            match redis.wait_ready().await {
                Ok(()) => return Ok(redis),
                Err(e) => {
                    last = e;
                    redis.kill().await;
                    // Keep the directory for the next attempt (`Drop` would remove it).
                    redis.dir = PathBuf::new();
                }
            }
        }
        let tail = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!(
            "redis-server did not start ({last}); its log:\n{}",
            tail.lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        ))
    }

    /// `redis://127.0.0.1:PORT` for the gateways' `REDIS_URL`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(format!("exited: {st}"));
                }
            }
            if ping(self.addr).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("no PONG within {START_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `None` while it runs; its exit status once it died.
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; removes the temp dir. Returns how it ended.
    pub async fn stop(&mut self, grace: Duration) -> Option<String> {
        let mut child = self.child.take()?;
        let how = if let Ok(Some(st)) = child.try_wait() {
            format!("had already exited: {st}")
        } else {
            if let Some(pid) = child.id() {
                // SAFETY: signalling our own child by pid.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(Ok(st)) => format!("exited after SIGTERM: {st}"),
                _ => {
                    let _ = child.kill().await;
                    format!("did not exit within {grace:?} of SIGTERM: killed")
                }
            }
        };
        self.remove_dir();
        Some(how)
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    fn remove_dir(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
            self.dir = PathBuf::new();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // The child is killed by `kill_on_drop`; only the directory is ours to clean.
        self.remove_dir();
    }
}

/// Counters read from `INFO commandstats` and `INFO stats`: calls per command, bytes in and out.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub calls: std::collections::BTreeMap<String, u64>,
    pub net_in: u64,
    pub net_out: u64,
}

impl Stats {
    /// `self - before`, dropping commands that did not move (and `info`, which is ours).
    pub fn since(&self, before: &Stats) -> Stats {
        let calls = self
            .calls
            .iter()
            .filter(|(cmd, _)| cmd.as_str() != "info")
            .map(|(cmd, &n)| (cmd.clone(), n - before.calls.get(cmd).copied().unwrap_or(0)))
            .filter(|&(_, n)| n > 0)
            .collect();
        Stats {
            calls,
            net_in: self.net_in.saturating_sub(before.net_in),
            net_out: self.net_out.saturating_sub(before.net_out),
        }
    }

    pub fn total_calls(&self) -> u64 {
        self.calls.values().sum()
    }
}

impl Redis {
    /// The server's command and traffic counters now (`None` if it does not answer in a second).
    pub async fn stats(&self) -> Option<Stats> {
        let mut st = Stats::default();
        for line in info(self.addr, "commandstats").await?.lines() {
            // cmdstat_publish:calls=12,usec=34,...
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            st.calls.insert(name.to_owned(), calls);
        }
        for line in info(self.addr, "stats").await?.lines() {
            if let Some(v) = line.strip_prefix("total_net_input_bytes:") {
                st.net_in = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("total_net_output_bytes:") {
                st.net_out = v.trim().parse().unwrap_or(0);
            }
        }
        Some(st)
    }
}

/// `INFO <section>` over RESP: the bulk string's text.
async fn info(addr: SocketAddr, section: &str) -> Option<String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("INFO {section}\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            // `$<len>\r\n<len bytes>\r\n`
            let Some(head_end) = buf.windows(2).position(|w| w == b"\r\n") else {
                continue;
            };
            let len: usize = std::str::from_utf8(buf.get(1..head_end)?)
                .ok()?
                .parse()
                .ok()?;
            if buf.len() >= head_end + 2 + len {
                let body = &buf[head_end + 2..head_end + 2 + len];
                return Some(String::from_utf8_lossy(body).into_owned());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
}

/// One `PING` over RESP: true on `+PONG`.
async fn ping(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        buf[..n].starts_with(b"+PONG").then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(()))
    )
}

/// A port that was free a moment ago on 127.0.0.1 (the listener is closed before returning).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh `/tmp/sse-load-redis.<pid>.<n>` (or under `$TMPDIR`).
fn temp_dir() -> Result<PathBuf, String> {
    let base = std::env::temp_dir();
    for n in 0..1000u32 {
        let p = base.join(format!("sse-load-redis.{}.{n}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", p.display())),
        }
    }
    Err("no free temp dir name".into())
}
