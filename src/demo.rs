//! Demo mode (`sse-gateway demo`): the gateway, a built-in backend double and a page, in one command.
//!
//! Owns three small things that exist only in demo mode:
//! - the **backend double**: an in-process hyper server on `127.0.0.1:0` that the gateway's
//!   `CALLBACK_URL` points at. It accepts every stream, answering connect with
//!   `{"channels":["demo"]}` (PROTOCOL §8), and remembers each stream's token under the `demo_id`
//!   query parameter that the page puts on its `EventSource` URL;
//! - the **page** at `GET /_demo/`, embedded in the binary, which opens an `EventSource`, shows what
//!   arrives, and sends events through the real `/internal/send` and `/internal/publish`; its live
//!   panel plots the gateway's own `GET /metrics`, and its burst button publishes 1000 events to
//!   channel `demo` itself, in ten `/internal/batch` requests (the double stays a plain callback
//!   server);
//! - `GET /_demo/token?id=<demo_id>` → `{"token":"..."}`, so the page learns its own token.
//!
//! Outside demo mode none of this runs and every `GET` path, `/_demo/` included, stays a stream path.
//! Nothing here touches the registry or frames: the page and the double speak to the gateway only
//! through its public HTTP contract, like a real browser and backend.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::Value;

use crate::body::ResponseBody;
use crate::config::{
    Config, ConfigError, ENV_CALLBACK_URL, ENV_HISTORY_SIZE, ENV_HISTORY_TTL_SECONDS, ENV_HOST,
    ENV_PORT,
};
use crate::{log, log::Level};

/// The page, embedded so that the binary alone is the whole demo.
pub const PAGE: &str = include_str!("demo.html");

/// The backend double's answer to every connect: join channel `demo`, so that
/// `POST /internal/publish {"channel":"demo"}` reaches every open demo page.
pub const CONNECT_ANSWER: &str = r#"{"channels":["demo"]}"#;

/// Streams whose token the double remembers at once. An entry is at most `MAX_ID_LEN` + 36 bytes
/// plus map overhead, so the worst case is well under 1 MiB; past the bound a stream is still
/// accepted, only its page cannot look its token up.
const MAX_REMEMBERED: usize = 4096;
/// Longest `demo_id` kept; the page makes 24 hex digits.
const MAX_ID_LEN: usize = 64;
/// A callback body is one small JSON object; the gateway's own are a few KiB with big cookies.
const MAX_CALLBACK_BYTES: usize = 64 * 1024;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Demo mode's shared state: the tokens the backend double saw, by the page's `demo_id`.
pub struct Demo {
    tokens: Mutex<HashMap<String, String>>,
    /// The double's callback URL, to tell whether `CALLBACK_URL` still points at it.
    backend_url: String,
}

impl fmt::Debug for Demo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Demo")
            .field("backend_url", &self.backend_url)
            .finish_non_exhaustive()
    }
}

impl Demo {
    pub fn new(backend_url: String) -> Demo {
        Demo {
            tokens: Mutex::new(HashMap::new()),
            backend_url,
        }
    }

    /// The token of the stream last opened with `demo_id=id`, while it is open.
    pub fn token(&self, id: &str) -> Option<String> {
        self.tokens.lock().get(id).cloned()
    }

    /// The backend double: one callback body in, `(status, body)` out.
    pub fn callback(&self, body: &[u8]) -> (StatusCode, &'static str) {
        let Ok(Value::Object(callback)) = serde_json::from_slice::<Value>(body) else {
            return (
                StatusCode::BAD_REQUEST,
                r#"{"error":"expected a JSON object"}"#,
            );
        };
        let token = callback.get("token").and_then(Value::as_str);
        let id = callback
            .get("request")
            .and_then(|r| r.get("url"))
            .and_then(Value::as_str)
            .and_then(|url| query_param(url, "demo_id"))
            .filter(|id| valid_id(id));
        match (callback.get("action").and_then(Value::as_str), token) {
            (Some("connect"), Some(token)) => {
                if let Some(id) = id {
                    let mut tokens = self.tokens.lock();
                    if tokens.len() < MAX_REMEMBERED || tokens.contains_key(id) {
                        tokens.insert(id.to_owned(), token.to_owned());
                    }
                }
                (StatusCode::OK, CONNECT_ANSWER)
            }
            (Some("disconnect"), Some(token)) => {
                if let Some(id) = id {
                    let mut tokens = self.tokens.lock();
                    // A reconnect may already have replaced this id's token with a newer one.
                    if tokens.get(id).is_some_and(|t| t == token) {
                        tokens.remove(id);
                    }
                }
                (StatusCode::OK, "{}")
            }
            _ => (
                StatusCode::BAD_REQUEST,
                r#"{"error":"expected action connect or disconnect, and a token"}"#,
            ),
        }
    }

    /// Answers a request for a path under `/_demo/` on the public listener.
    pub fn serve(&self, method: &Method, uri: &Uri) -> Response<ResponseBody> {
        let path = uri.path();
        if path == "/_demo" {
            let mut answer = json(StatusCode::PERMANENT_REDIRECT, r#"{"location":"/_demo/"}"#);
            answer
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/_demo/"));
            return answer;
        }
        if method != Method::GET {
            let mut answer = json(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"error":"Method not allowed"}"#,
            );
            answer
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return answer;
        }
        match path {
            "/_demo/" | "/_demo/index.html" => {
                let mut answer = Response::new(ResponseBody::Full(Some(Bytes::from_static(
                    PAGE.as_bytes(),
                ))));
                answer.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                answer
            }
            "/_demo/token" => match uri.query().and_then(|q| query_param(q, "id")) {
                Some(id) if valid_id(id) => match self.token(id) {
                    Some(token) => {
                        let body = serde_json::json!({ "token": token }).to_string();
                        let mut answer = Response::new(ResponseBody::Full(Some(body.into())));
                        answer.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        );
                        answer
                    }
                    None => json(StatusCode::NOT_FOUND, r#"{"error":"Unknown demo id"}"#),
                },
                _ => json(
                    StatusCode::BAD_REQUEST,
                    r#"{"error":"Invalid request: id must be 1-64 letters, digits, - or _"}"#,
                ),
            },
            _ => json(StatusCode::NOT_FOUND, r#"{"error":"Not found"}"#),
        }
    }
}

/// True when demo mode runs (`demo` is its state) and `path` is one of its own (`/_demo` or under
/// `/_demo/`).
pub fn reserves(demo: Option<&Demo>, path: &str) -> bool {
    demo.is_some() && (path == "/_demo" || path.starts_with("/_demo/"))
}

/// Answers a path that [`reserves`] claimed.
pub fn serve(demo: Option<&Demo>, method: &Method, uri: &Uri) -> Response<ResponseBody> {
    match demo {
        Some(demo) => demo.serve(method, uri),
        None => json(StatusCode::NOT_FOUND, r#"{"error":"Not found"}"#),
    }
}

/// Demo mode before the runtime exists: the double's listener is bound (its URL goes into the
/// config), and it starts serving once a runtime runs ([`Setup::spawn_backend`]). The state the
/// routes need is [`Setup::demo`]; the config holds settings only.
pub struct Setup {
    demo: Arc<Demo>,
    backend: std::net::TcpListener,
}

impl Setup {
    pub fn bind() -> io::Result<Setup> {
        let backend = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        backend.set_nonblocking(true)?;
        let url = format!("http://{}/sse-callback", backend.local_addr()?);
        Ok(Setup {
            demo: Arc::new(Demo::new(url)),
            backend,
        })
    }

    /// The process environment with demo defaults under it.
    pub fn config(&self) -> Result<Config, ConfigError> {
        self.config_from(|name| std::env::var(name).ok())
    }

    /// `lookup` first, then the demo defaults: `HOST=127.0.0.1`, `PORT=3000`, `CALLBACK_URL` the
    /// built-in double, and history on (`HISTORY_SIZE=100`, `HISTORY_TTL_SECONDS=60`, so that a page
    /// away for over a minute shows the gap). An operator's `CALLBACK_URL` still wins (the tests use
    /// one that can refuse).
    pub fn config_from(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| {
            lookup(name).or_else(|| match name {
                ENV_HOST => Some("127.0.0.1".to_owned()),
                ENV_PORT => Some("3000".to_owned()),
                ENV_CALLBACK_URL => Some(self.demo.backend_url.clone()),
                ENV_HISTORY_SIZE => Some("100".to_owned()),
                ENV_HISTORY_TTL_SECONDS => Some("60".to_owned()),
                _ => None,
            })
        })
    }

    /// Demo mode's state, for the gateway's routes and [`announce`].
    pub fn demo(&self) -> Arc<Demo> {
        self.demo.clone()
    }

    /// Starts the backend double on the current tokio runtime.
    pub fn spawn_backend(self) -> io::Result<()> {
        let listener = tokio::net::TcpListener::from_std(self.backend)?;
        tokio::spawn(serve_backend(listener, self.demo));
        Ok(())
    }
}

/// Prints where to point a browser (whatever `LOG_LEVEL` says), and warns when the page cannot
/// learn its token because `CALLBACK_URL` points elsewhere.
pub fn announce(config: &Config, demo: &Demo, public: SocketAddr) {
    if config
        .callback_url
        .as_ref()
        .is_some_and(|url| url.raw != demo.backend_url)
    {
        log!(
            Level::Warn,
            "demo: CALLBACK_URL is set, so the built-in backend is unused and the page cannot look up its token"
        );
    }
    if config.internal_port.is_some() || config.internal_secret.is_some() {
        log!(
            Level::Warn,
            "demo: INTERNAL_PORT or INTERNAL_SECRET is set, so the page's send and publish buttons will be refused"
        );
    }
    println!("sse-gateway demo: open {}", page_url(public));
}

/// `http://<addr>/_demo/`, with a wildcard address replaced by loopback (what a browser can open).
pub fn page_url(public: SocketAddr) -> String {
    let host = match public.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/_demo/", SocketAddr::new(host, public.port()))
}

async fn serve_backend(listener: tokio::net::TcpListener, demo: Arc<Demo>) {
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(err) => {
                log!(Level::Warn, "demo backend: accept failed: {err}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let demo = demo.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let demo = demo.clone();
                async move { Ok::<_, Infallible>(backend_answer(&demo, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

async fn backend_answer(demo: &Demo, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = if request.method() != Method::POST {
        (StatusCode::METHOD_NOT_ALLOWED, r#"{"error":"POST only"}"#)
    } else {
        match Limited::new(request.into_body(), MAX_CALLBACK_BYTES)
            .collect()
            .await
        {
            Ok(body) => demo.callback(&body.to_bytes()),
            Err(_) => (StatusCode::BAD_REQUEST, r#"{"error":"unreadable body"}"#),
        }
    };
    let mut answer = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

/// The raw value of `key` in a query string or in a target's query (`/p?a=1&key=v`); no decoding,
/// since the ids this module accepts need none.
fn query_param<'a>(target: &'a str, key: &str) -> Option<&'a str> {
    let query = target.split_once('?').map_or(target, |(_, q)| q);
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn json(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut answer = Response::new(ResponseBody::Full(Some(Bytes::from_static(
        body.as_bytes(),
    ))));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(token: &str, url: &str) -> Vec<u8> {
        serde_json::json!({"action": "connect", "token": token, "request": {"url": url, "headers": {}}})
            .to_string()
            .into_bytes()
    }

    fn disconnect(token: &str, url: &str) -> Vec<u8> {
        serde_json::json!({"action": "disconnect", "reason": "client_closed", "token": token,
            "request": {"url": url, "headers": {}}})
        .to_string()
        .into_bytes()
    }

    fn body_text(answer: Response<ResponseBody>) -> (StatusCode, String) {
        let status = answer.status();
        match answer.into_body() {
            ResponseBody::Full(Some(bytes)) => (status, String::from_utf8(bytes.to_vec()).unwrap()),
            _ => panic!("expected a full body"),
        }
    }

    #[test]
    fn connect_is_accepted_into_channel_demo_and_remembered_by_demo_id() {
        let demo = Demo::new("http://x/cb".into());
        let (status, body) = demo.callback(&connect("t1", "/demo/stream?x=1&demo_id=abc"));
        assert_eq!(status, StatusCode::OK);
        let answer: Value = serde_json::from_str(body).unwrap();
        assert_eq!(answer, serde_json::json!({"channels": ["demo"]}));
        assert_eq!(demo.token("abc").as_deref(), Some("t1"));
        // A stream without a demo_id is accepted all the same, and remembered nowhere.
        assert_eq!(demo.callback(&connect("t2", "/other")).0, StatusCode::OK);
        assert_eq!(demo.tokens.lock().len(), 1);
    }

    #[test]
    fn a_reconnect_replaces_the_token_and_a_late_disconnect_of_the_old_one_keeps_it() {
        let demo = Demo::new("http://x/cb".into());
        demo.callback(&connect("old", "/s?demo_id=p"));
        demo.callback(&connect("new", "/s?demo_id=p"));
        assert_eq!(demo.token("p").as_deref(), Some("new"));
        assert_eq!(
            demo.callback(&disconnect("old", "/s?demo_id=p")).0,
            StatusCode::OK
        );
        assert_eq!(demo.token("p").as_deref(), Some("new"));
        demo.callback(&disconnect("new", "/s?demo_id=p"));
        assert_eq!(demo.token("p"), None);
    }

    #[test]
    fn malformed_callbacks_are_400_and_change_nothing() {
        let demo = Demo::new("http://x/cb".into());
        for body in [
            &b"not json"[..],
            b"[]",
            br#"{"action":"connect"}"#,
            br#"{"action":"other","token":"t","request":{"url":"/?demo_id=a"}}"#,
        ] {
            assert_eq!(demo.callback(body).0, StatusCode::BAD_REQUEST);
        }
        assert!(demo.tokens.lock().is_empty());
    }

    #[test]
    fn ids_are_bounded_in_length_count_and_alphabet() {
        let demo = Demo::new("http://x/cb".into());
        let long = "a".repeat(MAX_ID_LEN + 1);
        for url in [
            format!("/s?demo_id={long}"),
            "/s?demo_id=a%20b".into(),
            "/s?demo_id=".into(),
        ] {
            assert_eq!(demo.callback(&connect("t", &url)).0, StatusCode::OK);
        }
        assert!(demo.tokens.lock().is_empty());
        for i in 0..MAX_REMEMBERED + 10 {
            demo.callback(&connect(&format!("t{i}"), &format!("/s?demo_id=i{i}")));
        }
        assert_eq!(demo.tokens.lock().len(), MAX_REMEMBERED);
        // A remembered id still follows its reconnects when the map is full.
        demo.callback(&connect("again", "/s?demo_id=i0"));
        assert_eq!(demo.token("i0").as_deref(), Some("again"));
    }

    #[test]
    fn the_page_and_token_routes() {
        let demo = Demo::new("http://x/cb".into());
        let get = |target: &str| demo.serve(&Method::GET, &target.parse().unwrap());

        let page = get("/_demo/");
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(body_text(page).1.contains("new EventSource("));

        assert_eq!(
            body_text(get("/_demo/token?id=nobody")),
            (
                StatusCode::NOT_FOUND,
                r#"{"error":"Unknown demo id"}"#.into()
            )
        );
        assert_eq!(get("/_demo/token").status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            get("/_demo/token?id=a%2Fb").status(),
            StatusCode::BAD_REQUEST
        );
        demo.callback(&connect("tok-1", "/demo/stream?demo_id=me"));
        assert_eq!(
            body_text(get("/_demo/token?id=me")),
            (StatusCode::OK, r#"{"token":"tok-1"}"#.into())
        );

        assert_eq!(get("/_demo/elsewhere").status(), StatusCode::NOT_FOUND);
        let redirect = get("/_demo");
        assert_eq!(redirect.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(redirect.headers()[header::LOCATION], "/_demo/");
        let post = demo.serve(&Method::POST, &"/_demo/".parse().unwrap());
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET");
    }

    #[test]
    fn the_page_is_self_contained() {
        // No CDN, no external file: the binary alone is the demo.
        for external in [
            "src=\"http",
            "href=\"http",
            "src='http",
            "href='http",
            "@import",
        ] {
            assert!(!PAGE.contains(external), "{external}");
        }
        // The one <link> is the empty icon: a browser's own GET /favicon.ico would open a stream.
        assert_eq!(PAGE.matches("<link").count(), 1);
        assert!(PAGE.contains(r#"<link rel="icon" href="data:,">"#));
        for needed in [
            "/internal/send",
            "/internal/publish",
            "/internal/batch",
            "/_demo/token",
            "addEventListener",
            "lastEventId",
            // A 7th stream on one origin waits; the page says why instead of looking broken.
            "6 connections per origin",
            "id=\"stalled\"",
            // The answer box gives up on a request instead of showing "..." forever.
            "AbortController",
            // The live panel reads the real metrics; the burst goes through the real publish.
            "\"/metrics\"",
            "sse_gateway_publish_deliveries_total",
            "id=\"burst\"",
            "const BURST = 1000;",
        ] {
            assert!(PAGE.contains(needed), "{needed}");
        }
        assert!(
            !PAGE.contains("lands with PROTOCOL"),
            "stale: channels exist"
        );
    }

    #[test]
    fn demo_defaults_sit_under_the_environment() {
        let setup = Setup::bind().unwrap();
        let config = setup.config_from(|_| None).unwrap();
        assert_eq!(config.host.to_string(), "127.0.0.1");
        assert_eq!(config.port, 3000);
        let backend = &setup.demo.backend_url;
        assert!(backend.starts_with("http://127.0.0.1:"), "{backend}");
        assert_eq!(config.callback_url.unwrap().raw, *backend);

        let config = setup
            .config_from(|name| match name {
                "PORT" => Some("0".into()),
                "CALLBACK_URL" => Some("http://127.0.0.1:9/cb".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.port, 0);
        assert_eq!(config.callback_url.unwrap().raw, "http://127.0.0.1:9/cb");
        // A malformed value still stops start-up, naming the variable.
        let err = setup
            .config_from(|name| (name == "PORT").then(|| "x".into()))
            .unwrap_err();
        assert_eq!(err.variable(), "PORT");
    }

    #[test]
    fn page_urls_are_openable() {
        assert_eq!(
            page_url("0.0.0.0:3000".parse().unwrap()),
            "http://127.0.0.1:3000/_demo/"
        );
        assert_eq!(
            page_url("[::]:8080".parse().unwrap()),
            "http://[::1]:8080/_demo/"
        );
        assert_eq!(
            page_url("127.0.0.5:1".parse().unwrap()),
            "http://127.0.0.5:1/_demo/"
        );
        assert!(!reserves(None, "/_demo/"));
        let demo = Demo::new("http://x/cb".into());
        assert!(reserves(Some(&demo), "/_demo/"));
        assert!(reserves(Some(&demo), "/_demo"));
        assert!(!reserves(Some(&demo), "/_demox"));
    }
}
