//! Server: listeners, the accept loop, and the two-phase shutdown.
//!
//! Owns sockets until hyper takes them: binding (with a deep backlog for connect storms), accepting
//! with back-off when the process runs out of descriptors (no busy loop; service resumes as soon as
//! descriptors free up), one hyper HTTP/1.1 connection task per socket, and the drain on shutdown:
//! stop accepting → end every stream (`server_closed`) → wait, within `SHUTDOWN_GRACE_SECONDS`, for
//! connections to flush their last chunk and for disconnect callbacks to finish. hyper's graceful
//! shutdown alone never finishes while an SSE body is open (hyper#2787), which is why streams are
//! ended first. Routing is [`crate::routes`]'s business, not this module's.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::config::{
    Config, ENV_CALLBACK_URL, ENV_HOST, ENV_INTERNAL_HOST, ENV_INTERNAL_INSECURE,
    ENV_INTERNAL_PORT, ENV_PORT,
};
use crate::demo::Demo;
use crate::gateway::Gateway;
use crate::log::Level;
use crate::routes::Listener;

/// Pending connections the kernel may hold per listener; a connect storm of a few thousand browsers
/// (a deploy, a network blip) should queue, not be refused. The kernel caps it at `somaxconn`.
const BACKLOG: u32 = 4096;
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

pub struct Listeners {
    pub public: TcpListener,
    pub internal: Option<TcpListener>,
}

/// A listener that could not be bound: its address, the variables that chose it, and why.
#[derive(Debug)]
pub struct BindError {
    pub addr: SocketAddr,
    /// `"HOST, PORT"` or `"INTERNAL_HOST, INTERNAL_PORT"`.
    pub variables: String,
    pub source: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot listen on {} ({}): {}",
            self.addr, self.variables, self.source
        )
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl Listeners {
    /// Binds `HOST:PORT` and, when `INTERNAL_PORT` is set, `INTERNAL_HOST:INTERNAL_PORT`.
    pub fn bind(config: &Config) -> Result<Listeners, BindError> {
        let bind_named = |addr: SocketAddr, host: &str, port: &str| {
            bind(addr).map_err(|source| BindError {
                addr,
                variables: format!("{host}, {port}"),
                source,
            })
        };
        let public = bind_named(
            SocketAddr::new(config.host, config.port),
            ENV_HOST,
            ENV_PORT,
        )?;
        let internal = config
            .internal_port
            .map(|port| {
                bind_named(
                    SocketAddr::new(config.internal_host, port),
                    ENV_INTERNAL_HOST,
                    ENV_INTERNAL_PORT,
                )
            })
            .transpose()?;
        Ok(Listeners { public, internal })
    }
}

pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves until `shutdown` resolves, then drains and returns. `demo` is demo mode's state, if on.
pub async fn run(
    config: Config,
    demo: Option<Arc<Demo>>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) {
    let grace = config.shutdown_grace;
    let cluster = match &config.redis_url {
        Some(url) => match Cluster::new(url, &config).await {
            Ok(cluster) => Some(cluster),
            Err(message) => {
                log!(Level::Error, "{message}");
                std::process::exit(2);
            }
        },
        None => None,
    };
    let gateway = Gateway::new(config, demo, cluster);
    let heartbeat = tokio::spawn(crate::heartbeat::run(gateway.clone()));
    // Every connection task and stream writer holds a receiver: `closed()` is "all of them are gone".
    let (drain, drain_rx) = watch::channel(false);
    let http = crate::connection::http1_builder(&gateway.config);

    let public_role = if listeners.internal.is_some() {
        Listener::Public
    } else {
        Listener::Combined
    };
    let public = accept_loop(listeners.public, &gateway, public_role, &http, &drain_rx);
    let internal = async {
        match listeners.internal {
            Some(listener) => {
                accept_loop(listener, &gateway, Listener::Internal, &http, &drain_rx).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = async { tokio::join!(public, internal) } => {}
        _ = shutdown => {}
    }

    log!(
        Level::Info,
        "shutting down: draining {} streams (grace {:?})",
        gateway.registry.len(),
        grace
    );
    gateway.drain();
    let _ = drain.send(true);
    drop(drain_rx);
    let drained = tokio::time::timeout(grace, async {
        drain.closed().await;
        if let Some(callbacks) = &gateway.callbacks {
            callbacks.wait_idle().await;
        }
    })
    .await;
    heartbeat.abort();
    match drained {
        Ok(()) => log!(Level::Info, "shutdown complete"),
        Err(_) => log!(
            Level::Warn,
            "shutdown grace period ended with work still in flight"
        ),
    }
}

async fn accept_loop(
    listener: TcpListener,
    gateway: &Arc<Gateway>,
    role: Listener,
    http: &http1::Builder,
    drain: &watch::Receiver<bool>,
) {
    let mut backoff = Duration::ZERO;
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                backoff = Duration::ZERO;
                // Frames are whole events; Nagle would only add latency to them.
                let _ = socket.set_nodelay(true);
                tokio::spawn(crate::connection::serve(
                    socket,
                    gateway.clone(),
                    role,
                    http.clone(),
                    drain.clone(),
                ));
            }
            Err(err) => {
                // EMFILE/ENFILE leave the connection in the backlog; retrying at once would spin.
                if backoff.is_zero() {
                    log!(Level::Warn, "accept failed, backing off: {err}");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_ACCEPT_BACKOFF);
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers now and returns a future that resolves on either.
/// Call it before binding: from the first listener line on, a signal must mean a clean drain, not
/// the default action (death).
pub fn shutdown_signal() -> io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => log!(Level::Info, "SIGTERM received"),
            _ = int.recv() => log!(Level::Info, "SIGINT received"),
        }
    })
}

/// A Redis URL fit for a log line: its `user:password@` part masked.
fn without_password(url: &str) -> String {
    match url.split_once("://").zip(url.rfind('@')) {
        Some(((scheme, _), at)) => format!("{scheme}://***{}", &url[at..]),
        None => url.to_owned(),
    }
}

/// Logs the start-up lines: listener addresses, settings, and what a setting leaves unserved or open.
pub fn describe(config: &Config, listeners: &Listeners) -> io::Result<()> {
    // The addresses are printed whatever LOG_LEVEL says: with PORT=0 they are the only way to
    // learn the port.
    let public = listeners.public.local_addr()?;
    crate::log::write(
        Level::Info,
        format_args!("public listener on http://{public}"),
    );
    if let Some(internal) = &listeners.internal {
        let internal = internal.local_addr()?;
        crate::log::write(
            Level::Info,
            format_args!("internal listener on http://{internal}"),
        );
    }
    log!(
        Level::Info,
        "settings: callback_url={} callback_timeout_ms={} heartbeat_interval_s={} max_connections={} max_queue_bytes={} max_send_bytes={} internal_secret={} shutdown_grace_s={} log_level={:?} worker_threads={} max_header_bytes={} body_timeout_s={} max_channels_per_stream={} callback_concurrency={} callback_retry_s={} internal_insecure={} max_batch_items={} redis_url={} cluster_timeout_ms={} history_size={} history_ttl_s={} history_max_bytes={}",
        config.callback_url.as_ref().map_or("(unset)", |u| u.raw.as_str()),
        config.callback_timeout.as_millis(),
        config.heartbeat_interval.as_secs(),
        config.max_connections,
        config.max_queue_bytes,
        config.max_send_bytes,
        if config.internal_secret.is_some() { "set" } else { "unset" },
        config.shutdown_grace.as_secs(),
        config.log_level,
        config.worker_threads.map_or("cores".to_string(), |n| n.to_string()),
        config.max_header_bytes,
        config.body_timeout.as_secs(),
        config.max_channels_per_stream,
        config.callback_concurrency,
        config.callback_retry.as_secs(),
        u8::from(config.internal_insecure),
        config.max_batch_items,
        config.redis_url.as_deref().map_or("(unset)".into(), without_password),
        config.cluster_timeout.as_millis(),
        config.history_size,
        config.history_ttl.as_secs(),
        config.history_max_bytes,
    );
    if config.callback_url.is_none() {
        log!(
            Level::Warn,
            "{ENV_CALLBACK_URL} is not set: every stream is refused with 503 until it is (set it to the backend's callback endpoint and restart); /readyz answers 503"
        );
    }
    if listeners.internal.is_none()
        && config.internal_secret.is_none()
        && config.internal_insecure
        && !public.ip().to_canonical().is_loopback()
    {
        log!(
            Level::Warn,
            "{ENV_INTERNAL_INSECURE}=1: /internal/* is served without authentication on http://{public}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn redis_passwords_stay_out_of_the_log() {
        use super::without_password;
        assert_eq!(
            without_password("redis://127.0.0.1:6379/1"),
            "redis://127.0.0.1:6379/1"
        );
        assert_eq!(
            without_password("redis://user:s3cret@10.0.0.1:6379"),
            "redis://***@10.0.0.1:6379"
        );
        assert_eq!(
            without_password("redis://:p@ss@host:1"),
            "redis://***@host:1"
        );
    }
}
