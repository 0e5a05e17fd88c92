//! sse-gateway: a Server-Sent Events sidecar that holds browsers' `EventSource` streams for a
//! stateless backend. The wire contract is `PROTOCOL.md` (the project's copy of the shared spec).
//!
//! # Layout
//! Data flows accept → route → callback → registry → frame → (queue → writer) → socket:
//! - [`server`]: listeners, accept loop with back-off, two-phase shutdown.
//! - [`connection`]: drives hyper on one socket; hands an accepted stream's socket to its writer;
//!   the edge bounds (request head size, 408 on a slow head, lingering close).
//! - [`routes`]: the hyper `Service`; `(listener, method, path)` → answer; statuses and JSON bodies.
//! - [`command`]: `/internal/*` bodies validated into typed commands, in the protocol's order; the
//!   shape of a batch and its items' `op`.
//! - [`callback`]: the pooled, bounded HTTP client for connect/disconnect callbacks; the disconnect
//!   queue and its retries.
//! - [`gateway`]: shared state, a stream's life cycle (admission, open, the one end report), and the
//!   operations API (send, publish, subscribe, unsubscribe) that routes call, directly or through a
//!   batch that writes each stream's frames once.
//! - [`registry`]: the sharded slab of open streams, addressed by token.
//! - [`channels`]: named channels' members, for one-request fan-out.
//! - [`cluster`]: with `REDIS_URL`, the other gateways of the deployment through Redis: requests for
//!   their tokens, publishes to every node's members, this node's channel interest.
//! - [`history`]: with `HISTORY_SIZE`, channel events kept for `Last-Event-ID` resume: positions,
//!   the gap rule, and the single node's in-memory keeper (Redis keeps it in a cluster).
//! - [`token`]: UUID v4 tokens that carry their registry address.
//! - [`stream`]: one stream's byte-bounded frame queue and end state.
//! - [`frame`]: SSE encoding, once per event, into shared `Bytes`.
//! - [`body`]: response bodies; a stream's body hands the stream over (the `Handoff`) once hyper
//!   wrote the head.
//! - [`writer`]: one task per stream writing batched, chunk-framed frames; notices the client leaving;
//!   a delivery to an idle stream writes its frame directly instead.
//! - [`heartbeat`]: the single task that sweeps every stream at a steady pace.
//! - [`memory`]: the runtime's park hook that hands freed memory back to the OS after a burst.
//! - [`metrics`], [`log`](mod@log), [`config`]: operations.
//! - [`cli`]: the command line (`demo`, `--help`, `--version`); settings are env vars only.
//! - [`demo`]: `sse-gateway demo`, a built-in backend double and a page at `/_demo/`.

pub mod body;
pub mod callback;
pub mod channels;
pub mod cli;
pub mod cluster;
pub mod command;
pub mod config;
pub mod connection;
pub mod demo;
pub mod frame;
pub mod gateway;
pub mod heartbeat;
pub mod history;
#[macro_use]
pub mod log;
pub mod memory;
pub mod metrics;
pub mod registry;
pub mod routes;
pub mod server;
pub mod stream;
pub mod token;
pub mod writer;

pub use config::Config;
pub use server::{run, Listeners};
