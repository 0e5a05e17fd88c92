//! Configuration: every setting of PROTOCOL.md §6, read from environment variables.
//!
//! Owns parsing and validation only. Values come in through [`Config::from_lookup`] so tests pass a
//! map instead of mutating the process environment. A malformed value is a [`ConfigError`] naming the
//! variable and what it takes; nothing is silently replaced by a default (`main` exits with status 2).
//! [`VARIABLES`] is the one list of variables, defaults and meanings: `--help` prints it, and a test
//! checks it against the `ENV_*` constants, the parsed defaults and README's configuration table.
//! Configuration holds settings only, never runtime state.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::log::Level;

pub const ENV_PORT: &str = "PORT";
pub const ENV_HOST: &str = "HOST";
pub const ENV_CALLBACK_URL: &str = "CALLBACK_URL";
pub const ENV_CALLBACK_TIMEOUT_MS: &str = "CALLBACK_TIMEOUT_MS";
pub const ENV_HEARTBEAT_INTERVAL_SECONDS: &str = "HEARTBEAT_INTERVAL_SECONDS";
pub const ENV_MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
pub const ENV_MAX_QUEUE_BYTES: &str = "MAX_QUEUE_BYTES";
pub const ENV_MAX_SEND_BYTES: &str = "MAX_SEND_BYTES";
pub const ENV_INTERNAL_PORT: &str = "INTERNAL_PORT";
pub const ENV_INTERNAL_HOST: &str = "INTERNAL_HOST";
pub const ENV_INTERNAL_SECRET: &str = "INTERNAL_SECRET";
pub const ENV_SHUTDOWN_GRACE_SECONDS: &str = "SHUTDOWN_GRACE_SECONDS";
pub const ENV_LOG_LEVEL: &str = "LOG_LEVEL";
pub const ENV_WORKER_THREADS: &str = "WORKER_THREADS";
pub const ENV_MAX_HEADER_BYTES: &str = "MAX_HEADER_BYTES";
pub const ENV_BODY_TIMEOUT_SECONDS: &str = "BODY_TIMEOUT_SECONDS";
pub const ENV_MAX_CHANNELS_PER_STREAM: &str = "MAX_CHANNELS_PER_STREAM";
pub const ENV_CALLBACK_CONCURRENCY: &str = "CALLBACK_CONCURRENCY";
pub const ENV_CALLBACK_RETRY_SECONDS: &str = "CALLBACK_RETRY_SECONDS";
pub const ENV_INTERNAL_INSECURE: &str = "INTERNAL_INSECURE";
pub const ENV_MAX_BATCH_ITEMS: &str = "MAX_BATCH_ITEMS";
pub const ENV_REDIS_URL: &str = "REDIS_URL";
pub const ENV_CLUSTER_TIMEOUT_MS: &str = "CLUSTER_TIMEOUT_MS";
pub const ENV_HISTORY_SIZE: &str = "HISTORY_SIZE";
pub const ENV_HISTORY_TTL_SECONDS: &str = "HISTORY_TTL_SECONDS";
pub const ENV_HISTORY_MAX_BYTES: &str = "HISTORY_MAX_BYTES";

/// One environment variable as `--help` and README's configuration table show it.
#[derive(Clone, Copy, Debug)]
pub struct Variable {
    pub name: &'static str,
    /// The value used when the variable is unset, as an operator would write it (`unset` and
    /// `cores` are not values).
    pub default: &'static str,
    pub meaning: &'static str,
}

/// Every variable, in the order `--help` prints them.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: ENV_PORT,
        default: "3000",
        meaning: "public port; 0 picks a free port, printed as `public listener on http://...`",
    },
    Variable {
        name: ENV_HOST,
        default: "0.0.0.0",
        meaning: "public address (IPv4 or IPv6)",
    },
    Variable {
        name: ENV_CALLBACK_URL,
        default: "unset",
        meaning: "backend callback endpoint, http:// only; unset: streams answer 503, /readyz 503",
    },
    Variable {
        name: ENV_CALLBACK_TIMEOUT_MS,
        default: "5000",
        meaning: "connect/disconnect callback timeout in milliseconds (>= 1)",
    },
    Variable {
        name: ENV_HEARTBEAT_INTERVAL_SECONDS,
        default: "15",
        meaning: "heartbeat period in seconds (>= 1)",
    },
    Variable {
        name: ENV_MAX_CONNECTIONS,
        default: "0",
        meaning: "open streams allowed at once (those whose connect callback is in flight count); 0 = no limit",
    },
    Variable {
        name: ENV_MAX_QUEUE_BYTES,
        default: "1048576",
        meaning: "per-stream bound on frames not yet taken by the socket; a send past it closes the stream",
    },
    Variable {
        name: ENV_MAX_SEND_BYTES,
        default: "1048576",
        meaning: "bound on /internal/* request bodies (413 past it)",
    },
    Variable {
        name: ENV_INTERNAL_PORT,
        default: "unset",
        meaning: "when set, /internal/* and /metrics move to this listener (0 = any free port)",
    },
    Variable {
        name: ENV_INTERNAL_HOST,
        default: "127.0.0.1",
        meaning: "address of the internal listener",
    },
    Variable {
        name: ENV_INTERNAL_SECRET,
        default: "unset",
        meaning: "when set, /internal/* needs `Authorization: Bearer <secret>` (constant-time compare)",
    },
    Variable {
        name: ENV_INTERNAL_INSECURE,
        default: "0",
        meaning: "1 = serve /internal/* without INTERNAL_SECRET on a public HOST that is not loopback (see the safe default)",
    },
    Variable {
        name: ENV_SHUTDOWN_GRACE_SECONDS,
        default: "10",
        meaning: "how long SIGTERM/SIGINT waits for streams to flush and callbacks to finish",
    },
    Variable {
        name: ENV_LOG_LEVEL,
        default: "info",
        meaning: "error, warn, info or debug",
    },
    Variable {
        name: ENV_WORKER_THREADS,
        default: "cores",
        meaning: "tokio worker threads (>= 1); unset: one per core",
    },
    Variable {
        name: ENV_MAX_HEADER_BYTES,
        default: "16384",
        meaning: "bound on a request's line plus headers (1024 to 16777216): 431, or 414 for a target alone over it",
    },
    Variable {
        name: ENV_BODY_TIMEOUT_SECONDS,
        default: "10",
        meaning: "time a request body may take to arrive after its head (>= 1); 408 past it",
    },
    Variable {
        name: ENV_MAX_CHANNELS_PER_STREAM,
        default: "1024",
        meaning: "channels one stream may be in; a subscribe past it is 400, a connect answer with more is 502",
    },
    Variable {
        name: ENV_CALLBACK_CONCURRENCY,
        default: "64",
        meaning: "callbacks of each action in flight at once (1 to 4096); the rest wait in a queue",
    },
    Variable {
        name: ENV_CALLBACK_RETRY_SECONDS,
        default: "30",
        meaning: "how long a disconnect callback that never reached the backend is retried (0 = no retry)",
    },
    Variable {
        name: ENV_MAX_BATCH_ITEMS,
        default: "1000",
        meaning: "operations one POST /internal/batch may hold (1 to 100000); more is 400 and nothing is applied",
    },
    Variable {
        name: ENV_REDIS_URL,
        default: "unset",
        meaning: "`redis://[user:password@]host:port[/db]`: join the gateways that share this Redis into one deployment (PROTOCOL §10); unset: one node, no Redis",
    },
    Variable {
        name: ENV_CLUSTER_TIMEOUT_MS,
        default: "1000",
        meaning: "how long a node waits for the others' answers (1 to 60000); a send past it is 504, a publish answers `complete:false`",
    },
    Variable {
        name: ENV_HISTORY_SIZE,
        default: "0",
        meaning: "events kept per channel for `Last-Event-ID` resume (0 to 10000; PROTOCOL §11); 0: history off, publishes carry no gateway id",
    },
    Variable {
        name: ENV_HISTORY_TTL_SECONDS,
        default: "300",
        meaning: "how long a kept event can be replayed (1 to 86400); an event older than that counts as lost (`gateway.gap`)",
    },
    Variable {
        name: ENV_HISTORY_MAX_BYTES,
        default: "67108864",
        meaning: "bytes of history all channels together may keep on one node (4096 to 2^40), oldest dropped first; in a cluster Redis keeps the history and its own `maxmemory` bounds it",
    },
];

/// A callback endpoint, split once at start-up so each callback only formats a request.
#[derive(Clone, Debug)]
pub struct CallbackUrl {
    /// The URL as the operator wrote it (logged).
    pub raw: String,
    /// The same, parsed once; cloning it per callback is a refcount bump.
    pub uri: http::Uri,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub callback_url: Option<CallbackUrl>,
    pub callback_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// 0 means no limit.
    pub max_connections: usize,
    pub max_queue_bytes: usize,
    pub max_send_bytes: usize,
    pub internal_port: Option<u16>,
    pub internal_host: IpAddr,
    pub internal_secret: Option<String>,
    pub shutdown_grace: Duration,
    pub log_level: Level,
    /// `None`: one per core.
    pub worker_threads: Option<usize>,
    /// Bound on a request's line plus headers (PROTOCOL §9).
    pub max_header_bytes: usize,
    /// Time a request body may take to arrive after its head.
    pub body_timeout: Duration,
    pub max_channels_per_stream: usize,
    /// Callbacks of each action in flight at once; the rest wait in a queue.
    pub callback_concurrency: usize,
    /// How long a disconnect that never reached the backend is retried.
    pub callback_retry: Duration,
    /// `INTERNAL_INSECURE=1`: serve `/internal/*` unauthenticated on a non-loopback public listener.
    pub internal_insecure: bool,
    /// Items one `/internal/batch` may hold (PROTOCOL §12).
    pub max_batch_items: usize,
    /// `REDIS_URL`: the deployment's Redis (PROTOCOL §10); `None` is one node and no Redis code.
    pub redis_url: Option<String>,
    /// How long a node waits for the other nodes' answers.
    pub cluster_timeout: Duration,
    /// Events kept per channel (PROTOCOL §11); 0 is history off.
    pub history_size: usize,
    pub history_ttl: Duration,
    /// Bytes of history kept in this process (single node).
    pub history_max_bytes: usize,
}

/// Why start-up stops (exit status 2); every case names the variable to change.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    Invalid {
        variable: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A well-formed value that the gateway refuses, alone or with the others; `reason` says why
    /// and what to set instead.
    Refused {
        variable: &'static str,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    /// The variable the message is about.
    pub fn variable(&self) -> &'static str {
        match self {
            ConfigError::Invalid { variable, .. } | ConfigError::Refused { variable, .. } => {
                variable
            }
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Invalid {
                variable,
                value,
                expected,
            } => write!(f, "invalid {variable}={value:?}: expected {expected}"),
            ConfigError::Refused {
                variable,
                value,
                reason,
            } => write!(f, "refusing {variable}={value:?}: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, which returns a variable's value if it is set.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let env = Env(&lookup);
        let config = Config {
            host: env.parse(ENV_HOST, "an IP address", IpAddr::from([0, 0, 0, 0]))?,
            port: env.parse(ENV_PORT, "a port number 0-65535", 3000)?,
            callback_url: env
                .get(ENV_CALLBACK_URL)
                .map(parse_callback_url)
                .transpose()?,
            callback_timeout: Duration::from_millis(env.ranged(
                ENV_CALLBACK_TIMEOUT_MS,
                "an integer number of milliseconds >= 1",
                1..=u64::MAX,
                5000,
            )?),
            heartbeat_interval: Duration::from_secs(env.ranged(
                ENV_HEARTBEAT_INTERVAL_SECONDS,
                "an integer number of seconds >= 1",
                1..=86_400 * 365,
                15,
            )?),
            max_connections: env.parse(
                ENV_MAX_CONNECTIONS,
                "a non-negative integer (0 = no limit)",
                0,
            )?,
            max_queue_bytes: env.ranged(
                ENV_MAX_QUEUE_BYTES,
                "an integer number of bytes >= 1",
                1..=usize::MAX,
                1 << 20,
            )?,
            max_send_bytes: env.ranged(
                ENV_MAX_SEND_BYTES,
                "an integer number of bytes >= 1",
                1..=usize::MAX,
                1 << 20,
            )?,
            internal_port: env.parse_opt(ENV_INTERNAL_PORT, "a port number 0-65535")?,
            internal_host: env.parse(
                ENV_INTERNAL_HOST,
                "an IP address",
                IpAddr::from([127, 0, 0, 1]),
            )?,
            internal_secret: match env.get(ENV_INTERNAL_SECRET) {
                Some(secret) if secret.is_empty() => {
                    return Err(ConfigError::Invalid {
                        variable: ENV_INTERNAL_SECRET,
                        value: secret,
                        expected: "a non-empty secret (or leave it unset)",
                    })
                }
                other => other,
            },
            shutdown_grace: Duration::from_secs(env.parse(
                ENV_SHUTDOWN_GRACE_SECONDS,
                "a non-negative integer number of seconds",
                10,
            )?),
            log_level: env.parse(
                ENV_LOG_LEVEL,
                "one of error, warn, info, debug",
                Level::Info,
            )?,
            worker_threads: match env.get(ENV_WORKER_THREADS) {
                None => None,
                Some(_) => Some(env.ranged(ENV_WORKER_THREADS, "an integer >= 1", 1..=1024, 1)?),
            },
            max_header_bytes: env.ranged(
                ENV_MAX_HEADER_BYTES,
                "an integer number of bytes from 1024 to 16777216",
                1024..=1 << 24,
                16 * 1024,
            )?,
            body_timeout: Duration::from_secs(env.ranged(
                ENV_BODY_TIMEOUT_SECONDS,
                "an integer number of seconds >= 1",
                1..=86_400,
                10,
            )?),
            max_channels_per_stream: env.ranged(
                ENV_MAX_CHANNELS_PER_STREAM,
                "an integer >= 1",
                1..=1 << 20,
                1024,
            )?,
            callback_concurrency: env.ranged(
                ENV_CALLBACK_CONCURRENCY,
                "an integer from 1 to 4096",
                1..=4096,
                64,
            )?,
            callback_retry: Duration::from_secs(env.ranged(
                ENV_CALLBACK_RETRY_SECONDS,
                "a non-negative integer number of seconds (0 = no retry)",
                0..=86_400,
                30,
            )?),
            internal_insecure: match env.get(ENV_INTERNAL_INSECURE).as_deref().map(str::trim) {
                None | Some("0") => false,
                Some("1") => true,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        variable: ENV_INTERNAL_INSECURE,
                        value: other.to_owned(),
                        expected: "0 or 1",
                    })
                }
            },
            // A batch's items all come from one body of at most MAX_SEND_BYTES, and the smallest
            // item (`{"op":"send","token":"x"}`) is ~25 B, so 1 MiB holds ~40k of them at most:
            // 100000 leaves room for a larger MAX_SEND_BYTES without allowing silly values.
            max_batch_items: env.ranged(
                ENV_MAX_BATCH_ITEMS,
                "an integer from 1 to 100000",
                1..=100_000,
                1000,
            )?,
            redis_url: env.get(ENV_REDIS_URL).map(parse_redis_url).transpose()?,
            cluster_timeout: Duration::from_millis(env.ranged(
                ENV_CLUSTER_TIMEOUT_MS,
                "an integer number of milliseconds from 1 to 60000",
                1..=60_000,
                1000,
            )?),
            history_size: env.ranged(
                ENV_HISTORY_SIZE,
                "an integer from 0 (history off) to 10000",
                0..=10_000,
                0,
            )?,
            history_ttl: Duration::from_secs(env.ranged(
                ENV_HISTORY_TTL_SECONDS,
                "an integer number of seconds from 1 to 86400",
                1..=86_400,
                300,
            )?),
            history_max_bytes: env.ranged(
                ENV_HISTORY_MAX_BYTES,
                "an integer number of bytes from 4096 to 1099511627776",
                4096..=1 << 40,
                64 << 20,
            )?,
        };
        config.check_internal_exposure()?;
        Ok(config)
    }

    /// PROTOCOL §9, safe by default: `/internal/*` is never served unauthenticated to other
    /// machines by accident. With neither `INTERNAL_SECRET` nor `INTERNAL_PORT` set, the public
    /// listener serves it, so that listener must be on loopback unless `INTERNAL_INSECURE=1`.
    fn check_internal_exposure(&self) -> Result<(), ConfigError> {
        if self.internal_secret.is_some()
            || self.internal_port.is_some()
            || self.internal_insecure
            || self.host.to_canonical().is_loopback()
        {
            return Ok(());
        }
        Err(ConfigError::Refused {
            variable: ENV_HOST,
            value: self.host.to_string(),
            reason: format!(
                "with neither {ENV_INTERNAL_SECRET} nor {ENV_INTERNAL_PORT} set, /internal/* \
                 (send, publish, subscribe) would be served without authentication on {host}, \
                 which other machines can reach. Set one of: {ENV_INTERNAL_SECRET}=<secret> \
                 (require `Authorization: Bearer <secret>`), {ENV_INTERNAL_PORT}=<port> (move \
                 /internal/* to {ENV_INTERNAL_HOST}, 127.0.0.1 by default), {ENV_HOST}=127.0.0.1 \
                 (loopback only), or {ENV_INTERNAL_INSECURE}=1 (serve it unauthenticated anyway, \
                 e.g. on a trusted private network)",
                host = self.host,
            ),
        })
    }
}

struct Env<'a, F>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
    }

    /// Parses `name` if set, else returns `default`.
    fn parse<T: std::str::FromStr>(
        &self,
        name: &'static str,
        expected: &'static str,
        default: T,
    ) -> Result<T, ConfigError> {
        Ok(self.parse_opt(name, expected)?.unwrap_or(default))
    }

    fn parse_opt<T: std::str::FromStr>(
        &self,
        name: &'static str,
        expected: &'static str,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => match value.trim().parse() {
                Ok(v) => Ok(Some(v)),
                Err(_) => Err(ConfigError::Invalid {
                    variable: name,
                    value,
                    expected,
                }),
            },
        }
    }

    fn ranged<T: std::str::FromStr + PartialOrd>(
        &self,
        name: &'static str,
        expected: &'static str,
        range: std::ops::RangeInclusive<T>,
        default: T,
    ) -> Result<T, ConfigError> {
        match self.parse_opt(name, expected)? {
            None => Ok(default),
            Some(v) if range.contains(&v) => Ok(v),
            Some(_) => Err(ConfigError::Invalid {
                variable: name,
                value: self.get(name).unwrap_or_default(),
                expected,
            }),
        }
    }
}

fn parse_callback_url(raw: String) -> Result<CallbackUrl, ConfigError> {
    let invalid = |raw: String| ConfigError::Invalid {
        variable: ENV_CALLBACK_URL,
        value: raw,
        expected: "an absolute http:// URL such as http://127.0.0.1:8000/sse-callback",
    };
    let uri: http::Uri = match raw.parse() {
        Ok(uri) => uri,
        Err(_) => return Err(invalid(raw)),
    };
    if uri.scheme_str() == Some("https") {
        return Err(ConfigError::Refused {
            variable: ENV_CALLBACK_URL,
            value: raw,
            reason: "https:// is not supported: the gateway calls its backend over plain HTTP. \
                     Use an http:// URL to a backend on the same host or private network, or put \
                     a TLS-terminating proxy (for example a local nginx or envoy) in between and \
                     point CALLBACK_URL at it over http://"
                .to_owned(),
        });
    }
    if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
        return Err(invalid(raw));
    }
    Ok(CallbackUrl { raw, uri })
}

/// `redis://[user:password@]host:port[/db]`: the shape is checked here, the rest by the Redis
/// client when the cluster starts.
fn parse_redis_url(raw: String) -> Result<String, ConfigError> {
    if raw.starts_with("rediss://") {
        return Err(ConfigError::Refused {
            variable: ENV_REDIS_URL,
            value: raw,
            reason: "rediss:// (TLS) is not supported: reach Redis over a private network or a \
                     local TLS tunnel (stunnel, spiped) and use redis://"
                .to_owned(),
        });
    }
    let host = raw
        .strip_prefix("redis://")
        .map(|rest| rest.rsplit_once('@').map_or(rest, |(_, host)| host))
        .and_then(|rest| rest.split(['/', '?']).next());
    match host {
        Some(host) if !host.is_empty() && !host.starts_with(':') => Ok(raw),
        _ => Err(ConfigError::Invalid {
            variable: ENV_REDIS_URL,
            value: raw,
            expected: "a URL such as redis://127.0.0.1:6379 or redis://user:password@host:6379/0",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_match_the_protocol() {
        // A secret, so that the default HOST=0.0.0.0 passes the safe-default check.
        let c = load(&[(ENV_INTERNAL_SECRET, "s")]).unwrap();
        assert_eq!(c.port, 3000);
        assert_eq!(c.host.to_string(), "0.0.0.0");
        assert!(c.callback_url.is_none());
        assert_eq!(c.callback_timeout, Duration::from_millis(5000));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(c.max_connections, 0);
        assert_eq!(c.max_queue_bytes, 1_048_576);
        assert_eq!(c.max_send_bytes, 1_048_576);
        assert_eq!(c.internal_port, None);
        assert_eq!(c.internal_host.to_string(), "127.0.0.1");
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.log_level, Level::Info);
        assert_eq!(c.worker_threads, None);
        assert_eq!(c.max_header_bytes, 16384);
        assert_eq!(c.body_timeout, Duration::from_secs(10));
        assert_eq!(c.max_channels_per_stream, 1024);
        assert_eq!(c.callback_concurrency, 64);
        assert_eq!(c.callback_retry, Duration::from_secs(30));
        assert!(!c.internal_insecure);
        assert_eq!(c.max_batch_items, 1000);
        assert_eq!(c.redis_url, None);
        assert_eq!(c.cluster_timeout, Duration::from_millis(1000));
    }

    #[test]
    fn every_bad_value_names_its_variable() {
        for (var, value) in [
            (ENV_PORT, "abc"),
            (ENV_PORT, "70000"),
            (ENV_HOST, "localhost:1"),
            (ENV_CALLBACK_URL, "ftp://x/y"),
            (ENV_CALLBACK_URL, "https://127.0.0.1:9/cb"),
            (ENV_CALLBACK_URL, "not a url"),
            (ENV_CALLBACK_TIMEOUT_MS, "0"),
            (ENV_HEARTBEAT_INTERVAL_SECONDS, "0"),
            (ENV_HEARTBEAT_INTERVAL_SECONDS, "1.5"),
            (ENV_MAX_CONNECTIONS, "-1"),
            (ENV_MAX_QUEUE_BYTES, "0"),
            (ENV_MAX_SEND_BYTES, "1MB"),
            (ENV_INTERNAL_PORT, "x"),
            (ENV_INTERNAL_HOST, "nowhere"),
            (ENV_INTERNAL_SECRET, ""),
            (ENV_SHUTDOWN_GRACE_SECONDS, "-3"),
            (ENV_LOG_LEVEL, "loud"),
            (ENV_WORKER_THREADS, "0"),
            (ENV_MAX_HEADER_BYTES, "100"),
            (ENV_BODY_TIMEOUT_SECONDS, "0"),
            (ENV_MAX_CHANNELS_PER_STREAM, "0"),
            (ENV_CALLBACK_CONCURRENCY, "0"),
            (ENV_CALLBACK_CONCURRENCY, "5000"),
            (ENV_CALLBACK_RETRY_SECONDS, "-1"),
            (ENV_REDIS_URL, "127.0.0.1:6379"),
            (ENV_REDIS_URL, "redis://"),
            (ENV_REDIS_URL, "redis://:6379"),
            (ENV_REDIS_URL, "rediss://127.0.0.1:6379"),
            (ENV_REDIS_URL, "http://127.0.0.1:6379"),
            (ENV_CLUSTER_TIMEOUT_MS, "0"),
            (ENV_CLUSTER_TIMEOUT_MS, "60001"),
            (ENV_INTERNAL_INSECURE, "yes"),
            (ENV_MAX_BATCH_ITEMS, "0"),
            (ENV_MAX_BATCH_ITEMS, "100001"),
            (ENV_MAX_BATCH_ITEMS, "ten"),
        ] {
            let err = load(&[(var, value)]).expect_err(var);
            assert_eq!(err.variable(), var, "{value}");
            assert!(err.to_string().contains(var));
        }
    }

    #[test]
    fn good_values_are_taken() {
        let c = load(&[
            (ENV_PORT, "0"),
            (ENV_HOST, "127.0.0.1"),
            (ENV_CALLBACK_URL, "http://127.0.0.1:9/cb"),
            (ENV_LOG_LEVEL, "debug"),
            (ENV_WORKER_THREADS, "1"),
            (ENV_INTERNAL_PORT, "0"),
            (ENV_MAX_BATCH_ITEMS, "100000"),
            (ENV_REDIS_URL, "redis://user:p%40ss@10.0.0.5:6380/2"),
            (ENV_CLUSTER_TIMEOUT_MS, "60000"),
        ])
        .unwrap();
        assert_eq!(c.max_batch_items, 100_000);
        assert_eq!(
            c.redis_url.as_deref(),
            Some("redis://user:p%40ss@10.0.0.5:6380/2")
        );
        assert_eq!(c.cluster_timeout, Duration::from_secs(60));
        assert_eq!(c.port, 0);
        assert_eq!(c.callback_url.unwrap().raw, "http://127.0.0.1:9/cb");
        assert_eq!(c.log_level, Level::Debug);
        assert_eq!(c.worker_threads, Some(1));
        assert_eq!(c.internal_port, Some(0));
    }

    #[test]
    fn internal_routes_are_public_only_on_loopback_or_when_insecure_is_said() {
        let refused = load(&[]).unwrap_err();
        assert!(matches!(refused, ConfigError::Refused { .. }), "{refused}");
        assert_eq!(refused.variable(), ENV_HOST);
        let message = refused.to_string();
        for fix in [
            ENV_INTERNAL_SECRET,
            ENV_INTERNAL_PORT,
            ENV_HOST,
            ENV_INTERNAL_INSECURE,
        ] {
            assert!(message.contains(fix), "{fix} in {message}");
        }
        for host in ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "fe80::1"] {
            let err = load(&[(ENV_HOST, host)]).expect_err(host);
            assert_eq!(err.variable(), ENV_HOST);
            for fix in [
                (ENV_INTERNAL_SECRET, "s"),
                (ENV_INTERNAL_PORT, "0"),
                (ENV_INTERNAL_INSECURE, "1"),
            ] {
                let c = load(&[(ENV_HOST, host), fix]).expect(host);
                assert_eq!(c.host.to_string(), host);
            }
            assert!(load(&[(ENV_HOST, host), (ENV_INTERNAL_INSECURE, "0")]).is_err());
        }
        for loopback in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            let c = load(&[(ENV_HOST, loopback)]).expect(loopback);
            assert!(!c.internal_insecure && c.internal_secret.is_none());
        }
    }

    #[test]
    fn an_https_callback_url_is_refused_with_what_to_do() {
        let err = load(&[
            (ENV_HOST, "127.0.0.1"),
            (ENV_CALLBACK_URL, "https://backend.example/cb"),
        ])
        .unwrap_err();
        assert_eq!(err.variable(), ENV_CALLBACK_URL);
        let message = err.to_string();
        for needed in [
            "https:// is not supported",
            "http://",
            "TLS-terminating proxy",
        ] {
            assert!(message.contains(needed), "{needed} in {message}");
        }
    }

    /// Every `pub const ENV_*` in this file, read from its source so a new one cannot be missed.
    fn env_constants() -> Vec<&'static str> {
        include_str!("config.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("pub const ENV_"))
            .filter_map(|l| l.split('"').nth(1))
            .collect()
    }

    #[test]
    fn the_table_lists_every_variable_once_with_its_parsed_default() {
        let names: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        let mut constants = env_constants();
        assert!(constants.len() >= 20, "{constants:?}");
        constants.sort_unstable();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, constants, "VARIABLES against the ENV_* constants");

        // Setting a variable to its documented default changes nothing. The secret keeps the
        // default HOST acceptable (and INTERNAL_SECRET's own default is "unset").
        let base = [(ENV_INTERNAL_SECRET, "s")];
        let defaults = format!("{:?}", load(&base).unwrap());
        for v in VARIABLES {
            if matches!(v.default, "unset" | "cores") {
                continue;
            }
            let c = load(&[base[0], (v.name, v.default)]).expect(v.name);
            assert_eq!(format!("{c:?}"), defaults, "{}={}", v.name, v.default);
        }
    }

    #[test]
    fn readme_configuration_table_matches() {
        let readme = include_str!("../README.md");
        for v in VARIABLES {
            let prefix = format!("| `{}` | ", v.name);
            let row = readme
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("README.md has no configuration row for {}", v.name));
            let default = row[prefix.len()..].split(" | ").next().unwrap();
            assert_eq!(
                default.trim_matches('`'),
                v.default,
                "README default of {}",
                v.name
            );
        }
    }
}
