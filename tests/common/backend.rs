//! The backend double: an HTTP/1.1 server on 127.0.0.1:0 in the test process that records every
//! callback (method, path, JSON body, arrival time) into a channel and answers as the test says,
//! per action: any status, any body, extra headers, a delay.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// How the double answers one callback.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            body: String::new(),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn body(mut self, body: impl Into<String>) -> Reply {
        self.body = body.into();
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// One request the double received.
#[derive(Debug, Clone)]
pub struct Callback {
    pub method: String,
    /// Path and query as received.
    pub path: String,
    pub content_type: Option<String>,
    pub raw: Vec<u8>,
    /// The body parsed as JSON (`Value::Null` when it was not JSON).
    pub body: Value,
    pub at: Instant,
    /// Which backend TCP connection carried it (0-based, in accept order).
    pub conn: usize,
}

impl Callback {
    pub fn action(&self) -> &str {
        self.body["action"].as_str().unwrap_or("")
    }

    pub fn token(&self) -> &str {
        self.body["token"].as_str().unwrap_or("")
    }

    pub fn reason(&self) -> Option<&str> {
        self.body.get("reason").and_then(Value::as_str)
    }

    pub fn url(&self) -> &str {
        self.body["request"]["url"].as_str().unwrap_or("")
    }
}

struct Rules {
    connect: Reply,
    disconnect: Reply,
}

struct Shared {
    rules: Mutex<Rules>,
    tx: mpsc::UnboundedSender<Callback>,
    connections: AtomicUsize,
    /// Connection tasks, so [`Backend::stop`] can close every socket like a dying process.
    conn_tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

pub struct Backend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Callback>,
    accept: JoinHandle<()>,
}

/// Default wait for a callback that must come.
pub const CALLBACK_WAIT: Duration = Duration::from_secs(5);

impl Backend {
    /// Starts the double; by default it answers every callback 200 with an empty body.
    pub async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            rules: Mutex::new(Rules {
                connect: Reply::ok(),
                disconnect: Reply::ok(),
            }),
            tx,
            connections: AtomicUsize::new(0),
            conn_tasks: Mutex::new(Vec::new()),
        });
        Backend {
            addr: listener.local_addr().unwrap(),
            accept: Backend::accept(listener, shared.clone()),
            shared,
            rx,
        }
    }

    /// Closes the listener and every connection, as a backend process that went away: the
    /// gateway's next connection attempt is refused. [`Backend::restart`] brings it back.
    pub fn stop(&self) {
        self.accept.abort();
        for task in self.shared.conn_tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Serves again on the same address, with the same rules and callback record.
    pub async fn restart(&mut self) {
        self.stop();
        // The aborted accept task drops its listener when it is next scheduled: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(err) if Instant::now() > deadline => panic!("rebind backend: {err}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        self.accept = Backend::accept(listener, self.shared.clone());
    }

    fn accept(listener: TcpListener, st: Arc<Shared>) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let conn = st.connections.fetch_add(1, Ordering::SeqCst);
                let shared = st.clone();
                let task = tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, shared.clone(), conn));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
                st.conn_tasks.lock().unwrap().push(task.abort_handle());
            }
        })
    }

    /// The callback URL (with a path and query, to check the gateway posts to it as given).
    pub fn url(&self) -> String {
        format!("http://{}/hooks/sse?src=gateway", self.addr)
    }

    pub const PATH: &'static str = "/hooks/sse?src=gateway";

    pub fn on_connect(&self, reply: Reply) {
        self.shared.rules.lock().unwrap().connect = reply;
    }

    pub fn on_disconnect(&self, reply: Reply) {
        self.shared.rules.lock().unwrap().disconnect = reply;
    }

    /// TCP connections the gateway opened to the double so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The next callback within `within`, if any.
    pub async fn try_next(&mut self, within: Duration) -> Option<Callback> {
        timeout(within, self.rx.recv()).await.ok().flatten()
    }

    /// The next callback; panics if none comes within [`CALLBACK_WAIT`].
    #[track_caller]
    pub fn next(&mut self) -> impl std::future::Future<Output = Callback> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            self.try_next(CALLBACK_WAIT)
                .await
                .unwrap_or_else(|| panic!("{caller}: no callback within {CALLBACK_WAIT:?}"))
        }
    }

    /// The next callback, which must be a connect; returns it.
    #[track_caller]
    pub fn next_connect(&mut self) -> impl std::future::Future<Output = Callback> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let cb = self.try_next(CALLBACK_WAIT).await.unwrap_or_else(|| {
                panic!("{caller}: no connect callback within {CALLBACK_WAIT:?}")
            });
            assert_eq!(
                cb.action(),
                "connect",
                "{caller}: expected a connect: {:?}",
                cb.body
            );
            cb
        }
    }

    /// The next callback, which must be the disconnect of `token` for `reason`.
    #[track_caller]
    pub fn next_disconnect<'a>(
        &'a mut self,
        token: &'a str,
        reason: &'a str,
    ) -> impl std::future::Future<Output = Callback> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let cb = self.try_next(CALLBACK_WAIT).await.unwrap_or_else(|| {
                panic!("{caller}: no disconnect ({reason}) for {token} within {CALLBACK_WAIT:?}")
            });
            assert_eq!(cb.action(), "disconnect", "{caller}: {:?}", cb.body);
            assert_eq!(cb.token(), token, "{caller}: {:?}", cb.body);
            assert_eq!(cb.reason(), Some(reason), "{caller}: {:?}", cb.body);
            cb
        }
    }

    /// Asserts that no callback arrives during `quiet` (absence can only be checked over a window).
    #[track_caller]
    pub fn expect_none(&mut self, quiet: Duration) -> impl std::future::Future<Output = ()> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            if let Some(cb) = self.try_next(quiet).await {
                panic!(
                    "{caller}: expected no callback, got {} {} {}",
                    cb.method,
                    cb.path,
                    String::from_utf8_lossy(&cb.raw)
                );
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn handle(
    req: hyper::Request<Incoming>,
    st: Arc<Shared>,
    conn: usize,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let raw = match req.into_body().collect().await {
        Ok(c) => c.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let reply = {
        let rules = st.rules.lock().unwrap();
        match body["action"].as_str() {
            Some("disconnect") => rules.disconnect.clone(),
            _ => rules.connect.clone(),
        }
    };
    let _ = st.tx.send(Callback {
        method,
        path,
        content_type,
        raw,
        body,
        at: Instant::now(),
        conn,
    });
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut resp = hyper::Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        resp = resp.header(k.as_str(), v.as_str());
    }
    if !reply.body.is_empty() {
        resp = resp.header("content-type", "application/json");
    }
    Ok(resp
        .body(Full::new(Bytes::from(reply.body)))
        .expect("valid reply"))
}

/// A callback URL whose port nothing listens on (bound, then released).
pub fn down_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/hooks/sse")
}
