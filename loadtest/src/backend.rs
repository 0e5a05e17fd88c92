//! The backend double: the connect/disconnect callback server the gateway calls. It accepts every
//! connect, learns each stream's token from the `c=<n>` query parameter that `request.url` carries,
//! and counts disconnect callbacks per token so a run can check "exactly one disconnect per accepted
//! connect" (PROTOCOL §2). It answers at once, or after a set delay (connects only, `--callback-delay-ms`),
//! or after a random delay for every callback (`soak`'s slow backend).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[derive(Default)]
struct TokenInfo {
    disconnects: u32,
}

#[derive(Default)]
struct Registry {
    tokens: HashMap<String, TokenInfo>,
    by_client: HashMap<u64, String>,
    /// Disconnect callbacks for tokens this backend never accepted.
    unknown_disconnects: u64,
    reasons: HashMap<String, u64>,
}

pub struct Backend {
    reg: Mutex<Registry>,
    /// The body of every 2xx connect answer: `{}` or `{"channels":[..]}` for `--publish`.
    connect_answer: String,
    /// `resume`: channels chosen per stream instead (see `with_plan`).
    plan: Option<Plan>,
    /// Delay before answering a connect callback.
    connect_delay: Duration,
    /// `soak`: every callback (connect and disconnect) is answered after a delay drawn from this
    /// range, like a backend that is slow and uneven.
    slow: Option<(Duration, Duration)>,
    /// Draws for `slow`.
    draws: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub bad_callbacks: AtomicU64,
}

/// The exactly-once audit over every token this backend accepted.
#[derive(Debug, Default, Clone)]
pub struct Audit {
    pub tokens: u64,
    pub without_disconnect: u64,
    pub duplicate_disconnects: u64,
    pub unknown_disconnects: u64,
    pub reasons: Vec<(String, u64)>,
}

impl Audit {
    pub fn ok(&self) -> bool {
        self.without_disconnect == 0
            && self.duplicate_disconnects == 0
            && self.unknown_disconnects == 0
    }

    pub fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "without_disconnect": self.without_disconnect,
            "duplicate_disconnects": self.duplicate_disconnects,
            "unknown_disconnects": self.unknown_disconnects,
            "reasons": self.reasons.iter().cloned().collect::<HashMap<_, _>>(),
        })
    }

    pub fn human(&self) -> String {
        let reasons: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        format!(
            "{} accepted tokens: {} without a disconnect callback, {} duplicate disconnects, {} disconnects for unknown tokens; reasons {}",
            self.tokens,
            self.without_disconnect,
            self.duplicate_disconnects,
            self.unknown_disconnects,
            if reasons.is_empty() { "-".into() } else { reasons.join(" ") }
        )
    }
}

/// Per-stream channels for the connect answer (`resume`).
#[derive(Debug, Clone)]
pub struct Plan {
    pub prefix: String,
    pub count: usize,
    /// Every stream in every channel; else stream `c` in channel `c % count` only.
    pub all: bool,
}

impl Plan {
    /// The channel names stream `client` is put in.
    pub fn channels(&self, client: u64) -> Vec<String> {
        let n = self.count.max(1);
        if self.all {
            (0..n).map(|k| self.name(k)).collect()
        } else {
            vec![self.name(client as usize % n)]
        }
    }

    pub fn name(&self, k: usize) -> String {
        format!("{}{k}", self.prefix)
    }

    fn answer(&self, client: u64) -> String {
        json!({ "channels": self.channels(client) }).to_string()
    }
}

fn is_connect(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v["action"] == "connect")
}

/// The `c` query parameter of a request target, e.g. `/s?c=42` -> 42.
pub fn client_id(url: &str) -> Option<u64> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("c="))
        .and_then(|v| v.parse().ok())
}

impl Backend {
    pub fn new(channels: Option<&str>, connect_delay: Duration) -> Arc<Self> {
        let connect_answer = match channels {
            Some(ch) => json!({ "channels": [ch] }).to_string(),
            None => "{}".to_owned(),
        };
        Arc::new(Backend {
            reg: Mutex::new(Registry::default()),
            connect_answer,
            plan: None,
            connect_delay,
            slow: None,
            draws: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            bad_callbacks: AtomicU64::new(0),
        })
    }

    /// A backend double that answers every callback after a delay drawn uniformly from
    /// `min..=max` (`soak`).
    pub fn slow(channels: Option<&str>, min: Duration, max: Duration) -> Arc<Self> {
        let mut b = Arc::into_inner(Backend::new(channels, Duration::ZERO)).expect("just built");
        b.slow = Some((min, max.max(min)));
        Arc::new(b)
    }

    /// A backend double whose connect answer puts each stream in channels `<prefix>0` ..
    /// `<prefix>{count-1}`: all of them, or only `<prefix>{c % count}` for the stream `?c=<c>`.
    pub fn with_plan(self: Arc<Self>, plan: Plan) -> Arc<Self> {
        let mut b = Arc::into_inner(self).expect("not shared yet");
        b.plan = Some(plan);
        Arc::new(b)
    }

    /// The longest a callback answer is held back.
    fn max_delay(&self) -> Duration {
        self.slow
            .map_or(self.connect_delay, |(_, max)| max.max(self.connect_delay))
    }

    /// The next `slow` delay (splitmix64 of a counter: uneven, reproducible, no dependency).
    fn draw_delay(&self) -> Option<Duration> {
        let (min, max) = self.slow?;
        let mut z = self
            .draws
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let span = (max - min).as_micros() as u64 + 1;
        Some(min + Duration::from_micros(z % span))
    }

    /// Starts serving callbacks on `listener`; the task ends with the runtime.
    pub fn start(self: &Arc<Self>, listener: TcpListener) {
        let me = self.clone();
        tokio::spawn(crate::serve::serve(listener, move |method, _path, body| {
            let me = me.clone();
            async move {
                if method != hyper::Method::POST {
                    return (405, r#"{"error":"POST only"}"#.to_owned());
                }
                if let Some(delay) = me.draw_delay() {
                    tokio::time::sleep(delay).await;
                } else if !me.connect_delay.is_zero() && is_connect(&body) {
                    tokio::time::sleep(me.connect_delay).await;
                }
                me.handle(&body)
            }
        }));
    }

    fn handle(&self, body: &Bytes) -> (u16, String) {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            self.bad_callbacks.fetch_add(1, Ordering::Relaxed);
            return (400, r#"{"error":"not JSON"}"#.to_owned());
        };
        let token = v["token"].as_str().unwrap_or_default().to_owned();
        let url = v["request"]["url"].as_str().unwrap_or_default();
        if token.is_empty() {
            self.bad_callbacks.fetch_add(1, Ordering::Relaxed);
            return (400, r#"{"error":"no token"}"#.to_owned());
        }
        let mut reg = self.reg.lock().unwrap();
        match v["action"].as_str() {
            Some("connect") => {
                self.connects.fetch_add(1, Ordering::Relaxed);
                let client = client_id(url);
                if let Some(c) = client {
                    reg.by_client.insert(c, token.clone());
                }
                reg.tokens.entry(token).or_default();
                match &self.plan {
                    Some(plan) => (200, plan.answer(client.unwrap_or(0))),
                    None => (200, self.connect_answer.clone()),
                }
            }
            Some("disconnect") => {
                self.disconnects.fetch_add(1, Ordering::Relaxed);
                let reason = v["reason"].as_str().unwrap_or("<none>").to_owned();
                *reg.reasons.entry(reason).or_default() += 1;
                match reg.tokens.get_mut(&token) {
                    Some(t) => t.disconnects += 1,
                    None => reg.unknown_disconnects += 1,
                }
                (200, "{}".to_owned())
            }
            _ => {
                self.bad_callbacks.fetch_add(1, Ordering::Relaxed);
                (400, r#"{"error":"unknown action"}"#.to_owned())
            }
        }
    }

    /// The token the gateway gave the stream opened with `?c=<client>`.
    pub fn token_for(&self, client: u64) -> Option<String> {
        self.reg.lock().unwrap().by_client.get(&client).cloned()
    }

    pub fn audit(&self) -> Audit {
        let reg = self.reg.lock().unwrap();
        let mut a = Audit {
            tokens: reg.tokens.len() as u64,
            unknown_disconnects: reg.unknown_disconnects,
            ..Audit::default()
        };
        for t in reg.tokens.values() {
            match t.disconnects {
                0 => a.without_disconnect += 1,
                1 => {}
                n => a.duplicate_disconnects += (n - 1) as u64,
            }
        }
        a.reasons = reg.reasons.iter().map(|(k, v)| (k.clone(), *v)).collect();
        a.reasons.sort();
        a
    }

    /// Waits (bounded) until every accepted token got its disconnect callback; returns the audit and
    /// whether it completed before `timeout`.
    pub async fn wait_disconnects(&self, timeout: Duration) -> (Audit, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let a = self.audit();
            if a.without_disconnect == 0 {
                // Quiet for a while (no new connect callback, e.g. one still held by
                // --callback-delay-ms, and nothing missing): done. The grace also catches duplicate
                // disconnects arriving right behind the last one.
                let seen = self.connects.load(Ordering::Relaxed);
                tokio::time::sleep(self.max_delay() + Duration::from_millis(300)).await;
                let a = self.audit();
                if a.without_disconnect == 0 && self.connects.load(Ordering::Relaxed) == seen {
                    return (a, true);
                }
                continue;
            }
            if Instant::now() >= deadline {
                return (a, false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        assert_eq!(client_id("/s?c=42"), Some(42));
        assert_eq!(client_id("/s?x=1&c=7&y=2"), Some(7));
        assert_eq!(client_id("/s?cc=7"), None);
        assert_eq!(client_id("/s"), None);
    }

    #[test]
    fn plans() {
        let all = Plan {
            prefix: "h".into(),
            count: 3,
            all: true,
        };
        assert_eq!(all.channels(7), ["h0", "h1", "h2"]);
        assert_eq!(all.answer(1), r#"{"channels":["h0","h1","h2"]}"#);
        let one = Plan { all: false, ..all };
        assert_eq!(one.channels(7), ["h1"]);
    }

    #[test]
    fn audit_counts_exactly_once() {
        let b = Backend::new(None, Duration::ZERO);
        let cb = |action: &str, token: &str, c: u64| {
            Bytes::from(
                json!({"action": action, "reason": "client_closed", "token": token, "request": {"url": format!("/s?c={c}"), "headers": {}}})
                    .to_string(),
            )
        };
        assert_eq!(b.handle(&cb("connect", "t1", 1)).0, 200);
        assert_eq!(b.handle(&cb("connect", "t2", 2)).0, 200);
        b.handle(&cb("disconnect", "t1", 1));
        b.handle(&cb("disconnect", "t1", 1));
        b.handle(&cb("disconnect", "t9", 9));
        assert_eq!(b.token_for(2).as_deref(), Some("t2"));
        let a = b.audit();
        assert_eq!(
            (
                a.tokens,
                a.without_disconnect,
                a.duplicate_disconnects,
                a.unknown_disconnects
            ),
            (2, 1, 1, 1)
        );
        assert!(!a.ok());
    }
}
