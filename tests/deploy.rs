//! The deploy recipe in `deploy/`, run: Debian's nginx with the shipped `deploy/nginx.conf` in front
//! of a gateway started with the shipped systemd unit's settings, all on 127.0.0.1.
//!
//! The nginx config under test is the shipped file itself with two lines substituted (its listen
//! port and the gateway's address), included from a small main config that keeps nginx's pid, logs
//! and temp files in a temp directory (`nginx -p DIR -c FILE -g 'daemon off;'`; no root paths).
//! Without `/usr/sbin/nginx` the test says so and skips, unless `CI` is set (`.ci/run` installs
//! nginx-light): there it fails.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::http::{open_stream_with, request, HttpConn};
use common::{Backend, End, Gateway, Item, NoItem, SOON};
use serde_json::json;
use tokio::time::Instant;

const NGINX: &str = "/usr/sbin/nginx";
const NGINX_CONF: &str = include_str!("../deploy/nginx.conf");
const UNIT: &str = include_str!("../deploy/sse-gateway.service");
/// The two lines of `deploy/nginx.conf` that the test rewrites.
const LISTEN_LINE: &str = "    listen 80;\n";
const UPSTREAM_LINE: &str = "    server 127.0.0.1:3000;\n";
/// "Not buffered": an event sent after the stream opened reaches the client within this.
const PROMPT: Duration = Duration::from_secs(1);

/// `Environment=NAME=value` lines of the unit's `[Service]` section.
fn unit_environment() -> BTreeMap<String, String> {
    UNIT.lines()
        .filter_map(|line| line.trim().strip_prefix("Environment="))
        .map(|assignment| {
            let (name, value) = assignment
                .split_once('=')
                .unwrap_or_else(|| panic!("Environment={assignment} has no value"));
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

/// The value of `Key=` in the unit (its last assignment, as systemd reads it).
fn unit_setting(key: &str) -> Option<&'static str> {
    UNIT.lines()
        .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

/// Whether the tests run under CI (`CI=true`, as CI sets it; any value but empty, 0 or false).
fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// A port that was free a moment ago on 127.0.0.1 (nginx has no "port 0, tell me").
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// `deploy/nginx.conf` for this run: its listen line on `port` at 127.0.0.1, its upstream at
/// `gateway`; nothing else changed.
fn site_config(port: u16, gateway: SocketAddr) -> String {
    for line in [LISTEN_LINE, UPSTREAM_LINE] {
        assert_eq!(
            NGINX_CONF.matches(line).count(),
            1,
            "deploy/nginx.conf must hold {line:?} exactly once (tests/deploy.rs rewrites it)"
        );
    }
    NGINX_CONF
        .replace(LISTEN_LINE, &format!("    listen 127.0.0.1:{port};\n"))
        .replace(UPSTREAM_LINE, &format!("    server {gateway};\n"))
}

/// nginx running in the foreground as one process (`master_process off`), so that its PID is all
/// of it; stopped by that PID on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Nginx {
    async fn start(gateway: SocketAddr) -> Nginx {
        let dir = std::env::temp_dir().join(format!(
            "sse-gateway-deploy-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = free_port();
        std::fs::write(dir.join("sse-gateway.conf"), site_config(port, gateway)).unwrap();
        let d = dir.display();
        // What a distribution's nginx.conf would hold around the site, with paths under DIR; gzip
        // is on for event streams here so that the site's own `gzip off` is what the test checks.
        let main = format!(
            "master_process off;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             \x20   access_log {d}/access.log;\n\
             \x20   client_body_temp_path {d}/tmp/body;\n\
             \x20   proxy_temp_path {d}/tmp/proxy;\n\
             \x20   fastcgi_temp_path {d}/tmp/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20   scgi_temp_path {d}/tmp/scgi;\n\
             \x20   gzip on;\n\
             \x20   gzip_min_length 1;\n\
             \x20   gzip_types text/event-stream application/json;\n\
             \x20   include {d}/sse-gateway.conf;\n\
             }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting /usr/sbin/nginx");
        let mut nginx = Nginx {
            child,
            dir,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        };
        nginx.wait_listening().await;
        nginx
    }

    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("nginx exited ({status}):\n{}", self.error_log());
            }
            if HttpConn::try_connect(self.addr).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nginx not listening on {} within {SOON:?}:\n{}",
                self.addr,
                self.error_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// SIGTERM (nginx's fast shutdown) to our child's PID; waits for it to exit.
    async fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the PID of a child this process spawned and has not reaped.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill({}, SIGTERM)", self.pid());
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "nginx did not stop on SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET or POST through nginx; the answer must be nginx's own 404 page, not the gateway's JSON.
async fn assert_nginx_404(nginx: SocketAddr, method: &str, target: &str) {
    let body = br#"{"token":"x","event":{"data":"x"}}"#;
    let headers: &[(&str, &[u8])] = &[
        ("Content-Type", b"application/json"),
        ("Authorization", b"Bearer deploy-test-secret"),
    ];
    let r = request(nginx, method, target, headers, Some(body)).await;
    assert_eq!(r.status(), 404, "{method} {target}: {}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/html"),
        "{method} {target} must be answered by nginx itself: {}",
        r.text()
    );
    assert!(r.text().contains("nginx"), "{}", r.text());
}

#[tokio::test]
async fn nginx_with_the_shipped_config_passes_streams_on_at_once_and_hides_internal_routes() {
    if !Path::new(NGINX).exists() {
        assert!(
            !under_ci(),
            "{NGINX} is missing under CI: .ci/run installs it (apt-get install -y nginx-light)"
        );
        eprintln!(
            "SKIPPED: {NGINX} is missing (apt-get install nginx-light); deploy/nginx.conf untested"
        );
        return;
    }
    let mut backend = Backend::start().await;
    // The unit's settings, with its fixed ports replaced by free ones, its callback pointed at this
    // test's backend, the secret its EnvironmentFile would hold, and a 1 s heartbeat.
    let env = unit_environment();
    assert_eq!(env.get("HOST").map(String::as_str), Some("127.0.0.1"));
    let mut builder = Gateway::builder();
    for (name, value) in &env {
        builder = builder.env(name, value.as_str());
    }
    let gw = builder
        .env("PORT", "0")
        .env("INTERNAL_PORT", "0")
        .env("INTERNAL_SECRET", "deploy-test-secret")
        .env("HEARTBEAT_INTERVAL_SECONDS", "1")
        .callback(&backend)
        .spawn()
        .await;
    let mut nginx = Nginx::start(gw.addr).await;

    // A stream through nginx, asking for gzip (which the main config would apply to event streams).
    let mut stream = open_stream_with(
        nginx.addr,
        "/events/42?user=42",
        &[("Accept-Encoding", b"gzip")],
        None,
    )
    .await
    .unwrap_or_else(|r| panic!("stream through nginx: {} {}", r.status(), r.text()));
    let connect = backend.next_connect().await;
    assert_eq!(
        connect.url(),
        "/events/42?user=42",
        "nginx passes the target on"
    );
    assert_eq!(
        connect.body["request"]["headers"]["x-forwarded-for"], "127.0.0.1",
        "{connect:?}"
    );
    let token = connect.token().to_owned();
    assert_eq!(
        stream.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(stream.header("content-encoding"), None, "never compressed");

    // Events sent to the internal port after the stream opened arrive at once, one by one.
    for i in 0..3 {
        let sent = Instant::now();
        gw.send_ok(&json!({"token": token, "event": {"data": format!("event {i}")}}))
            .await;
        let event = stream.next_event(SOON).await;
        let took = sent.elapsed();
        assert_eq!(event.data, format!("event {i}"));
        assert!(took < PROMPT, "event {i} took {took:?} through nginx");
    }

    // Heartbeats (every second here) pass through nginx too.
    let deadline = Instant::now() + Duration::from_millis(3500);
    let mut heartbeats = 0;
    while heartbeats < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match stream.next_item(left).await {
            Ok(Item::Comment(text)) => {
                assert_eq!(text, "heartbeat");
                heartbeats += 1;
            }
            Ok(Item::Event(e)) => panic!("unexpected event {e:?}"),
            Err(NoItem::Timeout) => panic!("{heartbeats} heartbeats through nginx in 3.5 s"),
            Err(NoItem::Ended(end)) => panic!("stream ended ({end:?}) waiting for heartbeats"),
        }
    }

    // The backend's API and the metrics are not reachable through nginx, however spelled.
    for (method, target) in [
        ("POST", "/internal/send"),
        ("POST", "/internal/publish"),
        ("POST", "/%69nternal/send"),
        ("GET", "/metrics"),
        ("GET", "/metrics?x=1"),
    ] {
        assert_nginx_404(nginx.addr, method, target).await;
    }
    // /healthz still passes (load balancers ask it).
    let health = request(nginx.addr, "GET", "/healthz", &[], None).await;
    assert_eq!(health.status(), 200, "{}", health.text());

    // `close: true` ends the stream cleanly through nginx; the backend hears server_closed.
    gw.send_ok(&json!({"token": token, "event": {"data": "bye"}, "close": true}))
        .await;
    let (end, items) = stream.end(SOON).await;
    assert_eq!(end, End::Clean);
    assert!(
        items
            .iter()
            .any(|i| matches!(i, Item::Event(e) if e.data == "bye")),
        "{items:?}"
    );
    backend.next_disconnect(&token, "server_closed").await;

    // nginx is stopped by its PID, the one its pid file names.
    let pid_file = std::fs::read_to_string(nginx.dir.join("nginx.pid")).unwrap();
    assert_eq!(pid_file.trim(), nginx.pid().to_string());
    let status = nginx.stop().await;
    assert!(
        status.success(),
        "nginx exited {status}:\n{}",
        nginx.error_log()
    );
}

#[test]
fn the_systemd_unit_sets_what_the_deploy_needs() {
    let env = unit_environment();
    // Every variable the unit sets is one the gateway knows (`--help` lists them all).
    let help = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .arg("--help")
        .output()
        .expect("sse-gateway --help");
    let help = String::from_utf8(help.stdout).unwrap();
    for name in env.keys() {
        assert!(
            help.contains(name.as_str()),
            "{name} is not a gateway variable"
        );
    }
    for (name, value) in [
        ("HOST", "127.0.0.1"),
        ("INTERNAL_HOST", "127.0.0.1"),
        ("PORT", "3000"),
    ] {
        assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
    }
    assert!(env.contains_key("CALLBACK_URL") && env.contains_key("INTERNAL_PORT"));
    // deploy/nginx.conf's upstream is the unit's public listener.
    assert!(NGINX_CONF.contains(&format!("server {}:{};", env["HOST"], env["PORT"])));
    // The secret comes from a file, never from the unit.
    assert!(!env.contains_key("INTERNAL_SECRET"));
    assert_eq!(
        unit_setting("EnvironmentFile"),
        Some("/etc/sse-gateway/env")
    );
    assert_eq!(unit_setting("Restart"), Some("on-failure"));
    assert_eq!(unit_setting("RestartPreventExitStatus"), Some("2"));
    let nofile: u64 = unit_setting("LimitNOFILE").unwrap().parse().unwrap();
    assert!(nofile >= 65536, "LimitNOFILE={nofile}");
    // systemd must wait out the drain (SHUTDOWN_GRACE_SECONDS, 10 s by default) before SIGKILL.
    let stop: u64 = unit_setting("TimeoutStopSec")
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(stop > 10, "TimeoutStopSec={stop}");

    // systemd's own check, where systemd is installed, with ExecStart at the built binary.
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if analyze.exists() {
        let dir = std::env::temp_dir().join(format!("sse-gateway-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let unit = dir.join("sse-gateway.service");
        let exec = format!("ExecStart={}", env!("CARGO_BIN_EXE_sse-gateway"));
        std::fs::write(
            &unit,
            UNIT.replace("ExecStart=/usr/local/bin/sse-gateway", &exec),
        )
        .unwrap();
        let out = Command::new(analyze)
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify: {stderr}"
        );
    }
}
