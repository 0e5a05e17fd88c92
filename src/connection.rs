//! Connection: one accepted socket, from hyper's request parsing to the hand-over of an SSE stream.
//!
//! Owns the driver around hyper's HTTP/1.1 connection. Every request is parsed, routed and answered
//! by hyper; when the answer is an accepted stream, hyper writes the response head, the body offers
//! its stream at the [`Handoff`] (see [`crate::body`]), and once the head is flushed the driver takes the socket back
//! (`Connection::into_parts`) and spawns the stream's [`writer`](crate::writer) on it. The hyper
//! connection, its two 8 KiB buffers and its task are freed then; an idle stream is left costing
//! only its writer task, its registry entry and its socket. The driver also passes the drain signal
//! on to hyper (graceful shutdown of keep-alive connections). It must not route or write frames.

use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::body::Handoff;
use crate::gateway::Gateway;
use crate::routes::{Listener, Routes};
use crate::writer::StreamWriter;
use crate::{log, log::Level};

/// hyper's IO: the socket, plus write bookkeeping for the [`Handoff`].
struct HandoffIo {
    io: TokioIo<TcpStream>,
    handoff: Arc<Handoff>,
}

impl HandoffIo {
    fn record<T>(&self, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        self.handoff.wrote(poll.is_pending());
        poll
    }
}

impl Read for HandoffIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for HandoffIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.record(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.record(poll)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves one accepted socket until it closes or its stream is handed to a writer.
pub async fn serve(
    socket: TcpStream,
    gateway: Arc<Gateway>,
    listener: Listener,
    http: http1::Builder,
    mut drain: watch::Receiver<bool>,
) {
    let handoff = Arc::new(Handoff::default());
    let routes = Routes::new(gateway, listener, handoff.clone());
    let io = HandoffIo {
        io: TokioIo::new(socket),
        handoff: handoff.clone(),
    };
    let mut conn = http.serve_connection(io, routes);
    let mut draining = *drain.borrow_and_update();
    if draining {
        Pin::new(&mut conn).graceful_shutdown();
    }
    let offer = loop {
        let step = poll_fn(|cx| match Pin::new(&mut conn).poll(cx) {
            Poll::Ready(result) => Poll::Ready(Some(result)),
            Poll::Pending if handoff.ready() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        });
        tokio::select! {
            biased;
            done = step => match done {
                Some(Ok(())) => return,
                Some(Err(err)) => {
                    log!(Level::Debug, "connection ended with error: {err}");
                    return;
                }
                None => break handoff.take().expect("ready() saw an offer"),
            },
            _ = drain.changed(), if !draining => {
                draining = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    // Bytes the client sent after its request (a pipelined request) are dropped with hyper's read
    // buffer: an SSE response never ends in a way that would let them be answered.
    let socket = conn.into_parts().io.io.into_inner();
    tokio::spawn(StreamWriter::new(socket, offer.guard, offer.chunked, drain));
}
