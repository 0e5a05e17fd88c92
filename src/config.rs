//! Configuration: every setting of PROTOCOL.md §6, read from environment variables.
//!
//! Owns parsing and validation only. Values come in through [`Config::from_lookup`] so tests pass a
//! map instead of mutating the process environment. A malformed value is a [`ConfigError`] naming the
//! variable and what it takes; nothing is silently replaced by a default (`main` exits with status 2).

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
    /// Demo mode's state (`sse-gateway demo`, set only by `main`; never from the environment):
    /// when `Some`, `/_demo/` is the demo page instead of a stream path.
    pub demo: Option<std::sync::Arc<crate::demo::Demo>>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {}={:?}: expected {}",
            self.variable, self.value, self.expected
        )
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
        Ok(Config {
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
                    return Err(ConfigError {
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
                    return Err(ConfigError {
                        variable: ENV_INTERNAL_INSECURE,
                        value: other.to_owned(),
                        expected: "0 or 1",
                    })
                }
            },
            demo: None,
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
                Err(_) => Err(ConfigError {
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
            Some(_) => Err(ConfigError {
                variable: name,
                value: self.get(name).unwrap_or_default(),
                expected,
            }),
        }
    }
}

fn parse_callback_url(raw: String) -> Result<CallbackUrl, ConfigError> {
    let invalid = |raw: String| ConfigError {
        variable: ENV_CALLBACK_URL,
        value: raw,
        expected: "an absolute http:// URL such as http://127.0.0.1:8000/sse-callback",
    };
    let uri: http::Uri = match raw.parse() {
        Ok(uri) => uri,
        Err(_) => return Err(invalid(raw)),
    };
    if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
        return Err(invalid(raw));
    }
    Ok(CallbackUrl { raw, uri })
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
        let c = load(&[]).unwrap();
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
    }

    #[test]
    fn every_bad_value_names_its_variable() {
        for (var, value) in [
            (ENV_PORT, "abc"),
            (ENV_PORT, "70000"),
            (ENV_HOST, "localhost:1"),
            (ENV_CALLBACK_URL, "ftp://x/y"),
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
            (ENV_INTERNAL_INSECURE, "yes"),
        ] {
            let err = load(&[(var, value)]).expect_err(var);
            assert_eq!(err.variable, var, "{value}");
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
        ])
        .unwrap();
        assert_eq!(c.port, 0);
        assert_eq!(c.callback_url.unwrap().raw, "http://127.0.0.1:9/cb");
        assert_eq!(c.log_level, Level::Debug);
        assert_eq!(c.worker_threads, Some(1));
        assert_eq!(c.internal_port, Some(0));
    }
}
