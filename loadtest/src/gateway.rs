//! The gateway under test: spawned here (`--gateway-bin`, on a free port, pointed at our callback
//! server, optionally pinned to a CPU) or attached to (`--url`, `--internal-url`, `--pid`). Either
//! way the rest of the tool sees a `Target`: two addresses and, when known, a pid to measure.

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a spawned gateway may take to log its listener address.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// WARN/ERROR log lines kept to show in the report.
const KEEP_LOG_LINES: usize = 12;

/// WARN and ERROR lines the spawned gateway logged.
#[derive(Default)]
pub struct LogWatch {
    pub warn: u64,
    pub error: u64,
    pub first: Vec<String>,
}

pub struct Target {
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub pid: Option<u32>,
    child: Option<Child>,
    /// SIGTERM was sent (by `terminate`).
    terminated: bool,
    pub log: Arc<Mutex<LogWatch>>,
}

/// `http://127.0.0.1:3000[/...]` -> 127.0.0.1:3000; refuses anything outside 127.0.0.0/8.
pub fn parse_url(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|_| format!("{url}: want http://127.x.y.z:PORT"))?;
    check_loopback(addr)?;
    Ok(addr)
}

pub fn check_loopback(addr: SocketAddr) -> Result<(), String> {
    match addr {
        SocketAddr::V4(a) if a.ip().is_loopback() => Ok(()),
        _ => Err(format!("{addr}: only 127.0.0.0/8 addresses are allowed")),
    }
}

impl Target {
    pub fn attach(url: &str, internal: Option<&str>, pid: Option<u32>) -> Result<Self, String> {
        let public = parse_url(url)?;
        let internal = match internal {
            Some(u) => parse_url(u)?,
            None => public,
        };
        Ok(Target {
            public,
            internal,
            pid,
            child: None,
            terminated: false,
            log: Arc::default(),
        })
    }

    /// Starts the gateway with `PORT=0 HOST=127.0.0.1 CALLBACK_URL=<callback>` plus `env`, and waits
    /// for its listener lines.
    pub async fn spawn(
        bin: &str,
        callback: SocketAddr,
        env: &[(String, String)],
        cpu: Option<usize>,
        log_path: Option<&str>,
    ) -> Result<Self, String> {
        let mut cmd = Command::new(bin);
        cmd.env("PORT", "0")
            .env("HOST", "127.0.0.1")
            .env("CALLBACK_URL", format!("http://{callback}/callback"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: `child_setup` makes only async-signal-safe calls; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || crate::sys::child_setup(cpu));
        }
        let wants_internal = env.iter().any(|(k, _)| k == "INTERNAL_PORT");
        let mut child = cmd.spawn().map_err(|e| format!("spawn {bin}: {e}"))?;
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stderr).lines();
        let mut log_file = match log_path {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|e| format!("{p}: {e}"))?,
            )),
            None => None,
        };
        let log: Arc<Mutex<LogWatch>> = Arc::default();
        let (mut public, mut internal) = (None, None);
        let found = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                note_line(&log, &line);
                if let Some(f) = log_file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if let Some(a) = listener_addr(&line, "public listener on http://") {
                    public = Some(a);
                }
                if let Some(a) = listener_addr(&line, "internal listener on http://") {
                    internal = Some(a);
                }
                if public.is_some() && (internal.is_some() || !wants_internal) {
                    return true;
                }
            }
            false
        })
        .await;
        let public = match (found, public) {
            (Ok(true), Some(p)) => p,
            _ => {
                let status = child.try_wait().ok().flatten();
                let lines = log.lock().unwrap().first.join("\n  ");
                return Err(format!(
                    "gateway did not log `public listener on http://...` within {START_TIMEOUT:?} (exit: {status:?}); its warnings/errors:\n  {lines}"
                ));
            }
        };
        check_loopback(public)?;
        // Keep draining stderr so the gateway never blocks on a full pipe.
        let watch = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                note_line(&watch, &line);
                if let Some(f) = log_file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
            }
            if let Some(f) = log_file.as_mut() {
                let _ = f.flush();
            }
        });
        Ok(Target {
            public,
            internal: internal.unwrap_or(public),
            pid,
            child: Some(child),
            terminated: false,
            log,
        })
    }

    /// `None` while the spawned gateway runs (or when attached); its exit status once it died.
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    /// Sends SIGTERM to a spawned gateway that still runs, without waiting (`stop` then waits):
    /// the nodes of a cluster drain at the same time.
    pub fn terminate(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if !self.terminated && matches!(child.try_wait(), Ok(None)) {
                if let Some(pid) = child.id() {
                    // SAFETY: signalling our own child by pid.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGTERM);
                    }
                    self.terminated = true;
                }
            }
        }
    }

    /// Stops a spawned gateway: SIGTERM (unless `terminate` sent it), then SIGKILL after `grace`.
    /// Returns how it ended.
    pub async fn stop(&mut self, grace: Duration) -> Option<String> {
        if !self.terminated {
            if let Ok(Some(st)) = self.child.as_mut()?.try_wait() {
                self.child = None;
                return Some(format!("had already exited: {st}"));
            }
            self.terminate();
        }
        let mut child = self.child.take()?;
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(st)) => Some(format!("exited after SIGTERM: {st}")),
            _ => {
                let _ = child.kill().await;
                Some(format!("did not exit within {grace:?} of SIGTERM: killed"))
            }
        }
    }
}

fn note_line(log: &Mutex<LogWatch>, line: &str) {
    let is_warn = line.contains("[WARN]");
    let is_error = line.contains("[ERROR]") || line.contains("panicked");
    if is_warn || is_error {
        let mut l = log.lock().unwrap();
        if is_warn {
            l.warn += 1;
        } else {
            l.error += 1;
        }
        if l.first.len() < KEEP_LOG_LINES {
            l.first.push(line.to_owned());
        }
    }
}

fn listener_addr(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let hostport = rest.split(|c: char| c == '/' || c.is_whitespace()).next()?;
    hostport.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("http://127.0.0.1:80/x").unwrap().port(), 80);
        assert!(parse_url("http://10.0.0.1:80").is_err());
        assert!(parse_url("https://127.0.0.1:80").is_err());
    }

    #[test]
    fn listener_lines() {
        let l = "2025-01-01T00:00:00Z [INFO] public listener on http://127.0.0.1:43211";
        assert_eq!(
            listener_addr(l, "public listener on http://"),
            Some("127.0.0.1:43211".parse().unwrap())
        );
        assert_eq!(listener_addr(l, "internal listener on http://"), None);
    }
}
