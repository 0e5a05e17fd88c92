//! A keep-alive HTTP/1.1 client for the gateway's `/internal/*` endpoints: one socket, one request
//! at a time, reconnecting after any error. A failed request is never retried (a retry could
//! deliver an event twice): it is reported and the caller counts it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::{parse_head, ChunkDecoder};

/// A request with no answer after this is counted as a timeout and its connection dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers from `/internal/*` are small JSON; a bigger one is an error.
const MAX_ANSWER: usize = 64 * 1024;

pub struct Sender {
    addr: SocketAddr,
    auth: Option<String>,
    sock: Option<TcpStream>,
    buf: Vec<u8>,
    req: Vec<u8>,
    /// Talk to nchan's publisher location instead of the gateway's `/internal/*` (see `nchan_post`).
    nchan: bool,
}

/// A request's outcome: the status and the body, or a transport failure.
pub type Answer = Result<(u16, Vec<u8>), String>;

impl Sender {
    pub fn new(addr: SocketAddr, secret: Option<&str>) -> Self {
        Sender {
            addr,
            auth: secret.map(|s| format!("Authorization: Bearer {s}\r\n")),
            sock: None,
            buf: Vec::with_capacity(1024),
            req: Vec::with_capacity(512),
            nchan: false,
        }
    }

    /// This sender talks to nchan (`--target nchan`).
    pub fn nchan(mut self) -> Self {
        self.nchan = true;
        self
    }

    /// POSTs a JSON body to `path`.
    pub async fn post(&mut self, path: &str, body: &[u8]) -> Answer {
        if self.nchan {
            return self.nchan_post(path, body).await;
        }
        self.post_raw(path, body, "application/json").await
    }

    /// The gateway's `/internal/send` and `/internal/publish` mapped onto nchan's publisher: the
    /// token (or channel) is the channel id, `event.data` the message body (nchan frames it as
    /// `data:` lines itself; `event.name` is dropped). nchan answers 201 when the channel has
    /// subscribers and 202 when it has none; they become 200 and 404, and a publish's
    /// `"subscribers"` becomes `"delivered"`, so the scenarios check nchan exactly as the gateway.
    async fn nchan_post(&mut self, path: &str, body: &[u8]) -> Answer {
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("nchan: bad body: {e}"))?;
        let channel = match path {
            "/internal/send" => v["token"].as_str(),
            "/internal/publish" => v["channel"].as_str(),
            _ => None,
        }
        .ok_or_else(|| format!("nchan: no mapping for {path}"))?
        .to_owned();
        let data = v["event"]["data"].as_str().unwrap_or_default().to_owned();
        let (status, answer) = self
            .post_raw(&format!("/pub/{channel}"), data.as_bytes(), "text/plain")
            .await?;
        let subscribers = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|a| a["subscribers"].as_u64());
        Ok(match status {
            201 => (
                200,
                serde_json::json!({"status": "ok", "delivered": subscribers})
                    .to_string()
                    .into_bytes(),
            ),
            202 => (404, br#"{"error":"no subscriber (nchan 202)"}"#.to_vec()),
            s => (s, answer),
        })
    }

    /// GETs `path` (`/readyz`, `/metrics`).
    pub async fn get(&mut self, path: &str) -> Answer {
        self.request("GET", path, b"", "application/json").await
    }

    async fn post_raw(&mut self, path: &str, body: &[u8], content_type: &str) -> Answer {
        self.request("POST", path, body, content_type).await
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        content_type: &str,
    ) -> Answer {
        let exchange = self.exchange(method, path, body, content_type);
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => {
                self.sock = None;
                Err(e)
            }
            Err(_) => {
                self.sock = None;
                Err("timeout".into())
            }
        }
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        content_type: &str,
    ) -> Result<(u16, Vec<u8>), String> {
        self.connect().await?;
        self.req.clear();
        self.push_request(method, path, content_type, body);
        let sock = self.sock.as_mut().expect("connected above");
        sock.write_all(&self.req).await.map_err(io_err)?;
        self.buf.clear();
        let head = loop {
            if let Some(h) = parse_head(&self.buf)? {
                break h;
            }
            if self.buf.len() > MAX_ANSWER {
                return Err("answer head too long".into());
            }
            read_more(sock, &mut self.buf).await?;
        };
        let mut rest = self.buf.split_off(head.len);
        let body = if head.chunked {
            let mut dec = ChunkDecoder::default();
            let mut out = Vec::new();
            let mut input = std::mem::take(&mut rest);
            loop {
                dec.feed(&input, |b| out.extend_from_slice(b))?;
                if dec.done() {
                    break out;
                }
                if out.len() > MAX_ANSWER {
                    return Err("answer too long".into());
                }
                input.clear();
                read_more(sock, &mut input).await?;
            }
        } else if let Some(len) = head.content_length {
            if len > MAX_ANSWER {
                return Err("answer too long".into());
            }
            while rest.len() < len {
                read_more(sock, &mut rest).await?;
            }
            rest.truncate(len);
            rest
        } else {
            // No length: the body runs to EOF and the connection can't be reused.
            head_close_body(sock, rest).await?
        };
        if head.close || (!head.chunked && head.content_length.is_none()) {
            self.sock = None;
        }
        Ok((head.status, body))
    }
}

impl Sender {
    /// POSTs every body to `path` as pipelined HTTP/1.1 requests (one write), then reads the
    /// answers in order. For load generation: it takes the client's per-request round trip and
    /// syscalls out of the figure. Answers must carry `Content-Length` (the gateway's always do);
    /// on any error the remaining requests count as failed with it.
    pub async fn post_pipelined(&mut self, path: &str, bodies: &[Vec<u8>]) -> Vec<Answer> {
        if self.nchan {
            // nchan's publisher takes a different request per token; send them one by one.
            let mut answers = Vec::with_capacity(bodies.len());
            for body in bodies {
                answers.push(self.post(path, body).await);
            }
            return answers;
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange_pipelined(path, bodies)).await {
            Ok(Ok(answers)) => answers,
            Ok(Err((mut answers, e))) => {
                self.sock = None;
                answers.resize(bodies.len(), Err(e));
                answers
            }
            Err(_) => {
                self.sock = None;
                vec![Err("timeout".into()); bodies.len()]
            }
        }
    }

    /// Opens the keep-alive connection if there is none, or if the one we have is stale: the
    /// gateway closes a connection idle for 30 s with an unasked-for 408 (PROTOCOL §9, hyper's
    /// header read timeout), and a request written after it would read that 408 as its answer.
    /// Anything readable before we asked (an answer or EOF) means the connection is done.
    async fn connect(&mut self) -> Result<(), String> {
        if let Some(sock) = &self.sock {
            let mut byte = [0u8; 1];
            match sock.try_read(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => self.sock = None,
            }
        }
        if self.sock.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect: {:?}", e.kind()))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.sock = Some(s);
        }
        Ok(())
    }

    /// Appends one `POST` request to the write buffer.
    fn push_request(&mut self, method: &str, path: &str, content_type: &str, body: &[u8]) {
        self.req.extend_from_slice(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nAccept: application/json\r\nContent-Length: {}\r\n{}\r\n",
                self.addr,
                body.len(),
                self.auth.as_deref().unwrap_or("")
            )
            .as_bytes(),
        );
        self.req.extend_from_slice(body);
    }

    async fn exchange_pipelined(
        &mut self,
        path: &str,
        bodies: &[Vec<u8>],
    ) -> Result<Vec<Answer>, (Vec<Answer>, String)> {
        let mut answers = Vec::with_capacity(bodies.len());
        self.connect().await.map_err(|e| (Vec::new(), e))?;
        self.req.clear();
        for body in bodies {
            self.push_request("POST", path, "application/json", body);
        }
        let sock = self.sock.as_mut().expect("connected above");
        if let Err(e) = sock.write_all(&self.req).await {
            return Err((answers, io_err(e)));
        }
        self.buf.clear();
        while answers.len() < bodies.len() {
            let head = loop {
                match parse_head(&self.buf) {
                    Ok(Some(h)) => break h,
                    Ok(None) => {}
                    Err(e) => return Err((answers, e)),
                }
                if let Err(e) = read_more(sock, &mut self.buf).await {
                    return Err((answers, e));
                }
            };
            let Some(len) = head.content_length.filter(|_| !head.chunked) else {
                return Err((answers, "pipelined answer without Content-Length".into()));
            };
            while self.buf.len() < head.len + len {
                if let Err(e) = read_more(sock, &mut self.buf).await {
                    return Err((answers, e));
                }
            }
            let body = self.buf[head.len..head.len + len].to_vec();
            self.buf.drain(..head.len + len);
            answers.push(Ok((head.status, body)));
            if head.close {
                self.sock = None;
                return Err((answers, "connection closed by gateway".into()));
            }
        }
        Ok(answers)
    }
}

async fn read_more(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 4096];
    let n = sock.read(&mut chunk).await.map_err(io_err)?;
    if n == 0 {
        return Err("connection closed by gateway".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

async fn head_close_body(sock: &mut TcpStream, mut rest: Vec<u8>) -> Result<Vec<u8>, String> {
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock.read(&mut chunk).await.map_err(io_err)?;
        if n == 0 {
            return Ok(rest);
        }
        if rest.len() > MAX_ANSWER {
            return Err("answer too long".into());
        }
        rest.extend_from_slice(&chunk[..n]);
    }
}

fn io_err(e: io::Error) -> String {
    format!("io: {:?}", e.kind())
}

/// Where a cluster's `/internal/*` requests go (`--via`): a fixed node, the node holding the token,
/// or another node (the next one), so every per-token request crosses to the holder through Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Node(usize),
    Holder,
    Other,
}

impl Via {
    /// The node a per-token request for a stream on node `holder` goes to, out of `nodes`.
    pub fn route(self, holder: usize, nodes: usize) -> usize {
        match self {
            Via::Node(k) => k,
            Via::Holder => holder,
            Via::Other => (holder + 1) % nodes.max(1),
        }
    }

    /// The node for requests that name no token (publish): the fixed node, else node 0.
    pub fn home(self) -> usize {
        match self {
            Via::Node(k) => k,
            Via::Holder | Via::Other => 0,
        }
    }
}

/// One keep-alive `Sender` per node, and `--via` to pick among them. Connections open on first use.
pub struct Router {
    senders: Vec<Sender>,
    via: Via,
}

impl Router {
    pub fn new(senders: Vec<Sender>, via: Via) -> Self {
        assert!(!senders.is_empty(), "a router needs a node");
        Router { senders, via }
    }

    /// The node a request for a token held by node `holder` goes to.
    pub fn route(&self, holder: usize) -> usize {
        self.via.route(holder, self.senders.len())
    }

    /// The sender for a token held by node `holder`.
    pub fn for_holder(&mut self, holder: usize) -> &mut Sender {
        let k = self.route(holder);
        &mut self.senders[k]
    }

    /// The sender to node `k`.
    pub fn node(&mut self, k: usize) -> &mut Sender {
        &mut self.senders[k]
    }
}

/// The JSON body of a send to one token: data `"<seq> <ts_us>"` (see `http::parse_payload`).
pub fn send_body(token: &str, name: &str, seq: u64, ts_us: u64, pad: &str) -> Vec<u8> {
    format!(r#"{{"token":"{token}","event":{{"name":"{name}","data":"{seq} {ts_us}{pad}"}}}}"#)
        .into_bytes()
}

/// The JSON body of a publish to one channel.
pub fn publish_body(channel: &str, name: &str, seq: u64, ts_us: u64) -> Vec<u8> {
    serde_json::json!({"channel": channel, "event": {"name": name, "data": format!("{seq} {ts_us}")}})
        .to_string()
        .into_bytes()
}
