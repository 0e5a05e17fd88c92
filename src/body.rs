//! Bodies: what hyper is given to send, for JSON answers and for SSE streams, and the [`Handoff`]
//! through which a stream body gives its stream to the connection driver.
//!
//! An SSE response body here carries no frames. hyper writes the response head; when it first polls
//! the body, the body hands its [`StreamGuard`] to the connection's [`Handoff`] and stays pending.
//! The connection driver ([`crate::connection`]) then takes the socket back from hyper and gives it,
//! with the guard, to the stream's writer ([`crate::writer`]). Why: hyper keeps two 8 KiB buffers
//! per connection for as long as the connection lives, which is most of what an idle stream would
//! otherwise cost. Nothing here does I/O; the driver's IO wrapper only reports its writes here.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;

use crate::gateway::StreamGuard;

/// The meeting point of a connection's stream body and its driver. The driver's IO wrapper counts
/// writes here so the driver can tell that the head went out after the body was first polled.
#[derive(Default)]
pub struct Handoff {
    offer: Mutex<Option<Offer>>,
    writes: AtomicU64,
    write_blocked: AtomicBool,
}

/// A stream offered by its body, for the driver to hand to a writer.
pub struct Offer {
    pub guard: StreamGuard,
    pub chunked: bool,
    /// `writes` when the body was polled: the head is still in hyper's buffer at that point.
    writes_at: u64,
}

impl Handoff {
    fn offer(&self, guard: StreamGuard, chunked: bool) {
        let writes_at = self.writes.load(Relaxed);
        *self.offer.lock() = Some(Offer {
            guard,
            chunked,
            writes_at,
        });
    }

    /// Records one write attempt on the connection's socket: finished, or blocked.
    pub fn wrote(&self, blocked: bool) {
        self.write_blocked.store(blocked, Relaxed);
        if !blocked {
            self.writes.fetch_add(1, Relaxed);
        }
    }

    /// True once a stream was offered and hyper has since written, with nothing left blocked: hyper
    /// flushes until its buffer is empty or the socket would block, so the head is fully out.
    pub fn ready(&self) -> bool {
        self.offer.lock().as_ref().is_some_and(|offer| {
            self.writes.load(Relaxed) > offer.writes_at && !self.write_blocked.load(Relaxed)
        })
    }

    pub fn take(&self) -> Option<Offer> {
        self.offer.lock().take()
    }
}

/// The body of an accepted SSE response until the connection driver takes the stream over.
pub struct StreamBody {
    guard: Option<StreamGuard>,
    /// Chunked framing (HTTP/1.1) or close-delimited (HTTP/1.0), as hyper chose for the head.
    chunked: bool,
    handoff: Arc<Handoff>,
}

impl StreamBody {
    pub fn new(guard: StreamGuard, chunked: bool, handoff: Arc<Handoff>) -> StreamBody {
        StreamBody {
            guard: Some(guard),
            chunked,
            handoff,
        }
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        // hyper has encoded the head by now; the driver, which is polling hyper on this same task,
        // detaches the socket as soon as that head is flushed. No waker is needed.
        if let Some(guard) = self.guard.take() {
            self.handoff.offer(guard, self.chunked);
        }
        Poll::Pending
    }
}

/// Every response body the gateway gives hyper.
pub enum ResponseBody {
    Full(Option<Bytes>),
    Stream(StreamBody),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Stream(stream) => Pin::new(stream).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseBody::Stream(_) => SizeHint::default(),
        }
    }
}
