//! Bodies: what hyper is given to send, for JSON answers and for SSE streams.
//!
//! An SSE response body here carries no frames. hyper writes the response head; when it first polls
//! the body, the body hands its [`StreamGuard`] to the connection's [`Handoff`] and stays pending.
//! The connection driver ([`crate::connection`]) then takes the socket back from hyper and gives it,
//! with the guard, to the stream's writer ([`crate::writer`]). Why: hyper keeps two 8 KiB buffers
//! per connection for as long as the connection lives, which is most of what an idle stream would
//! otherwise cost. Nothing here does I/O.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::connection::Handoff;
use crate::gateway::StreamGuard;

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

/// Never produced: a stream body yields no frames and no errors through hyper.
#[derive(Debug)]
pub enum Never {}

impl std::fmt::Display for Never {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

impl std::error::Error for Never {}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = Never;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Never>>> {
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
    type Error = Never;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Never>>> {
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
