//! Bodies: the `http_body::Body` hyper writes to the socket, for streams and for JSON answers.
//!
//! Owns the hand-off from a stream's queue to hyper and the "client went away" signal: hyper drops a
//! response body when its connection ends, so [`StreamBody`]'s `Drop` is where `client_closed` is
//! detected (and where the admission slot is given back). Frames pass through as the same `Bytes`
//! the sender encoded; nothing is copied here.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::gateway::Gateway;
use crate::stream::{EndReason, Next, Stream};

/// The body of an open SSE response; owns the stream's lifetime on the connection side.
pub struct StreamBody {
    stream: Arc<Stream>,
    gateway: Arc<Gateway>,
}

/// A queue overflow: hyper aborts the connection, so the client sees no clean end.
#[derive(Debug)]
pub struct Aborted;

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream queue overflowed")
    }
}

impl std::error::Error for Aborted {}

impl StreamBody {
    pub fn new(stream: Arc<Stream>, gateway: Arc<Gateway>) -> StreamBody {
        StreamBody { stream, gateway }
    }

    pub fn end(&self, reason: EndReason) {
        self.gateway.end(&self.stream, reason);
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = Aborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Aborted>>> {
        match self.stream.poll_next(cx.waker()) {
            Next::Frame(frame) => {
                self.gateway
                    .metrics
                    .bytes_sent_total
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(frame))))
            }
            Next::Pending => Poll::Pending,
            Next::Finished => Poll::Ready(None),
            Next::Aborted => Poll::Ready(Some(Err(Aborted))),
        }
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        self.gateway.end(&self.stream, EndReason::ClientClosed);
        self.gateway.release();
    }
}

/// Every response body the gateway sends: a complete JSON/text answer or an SSE stream.
pub enum ResponseBody {
    Full(Option<Bytes>),
    Stream(StreamBody),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Aborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Aborted>>> {
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
