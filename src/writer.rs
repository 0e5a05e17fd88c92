//! Writer: the task that moves one stream's frames from its queue to its socket, once hyper has
//! written the response head and let go of the socket (see [`crate::connection`]).
//!
//! Owns the body's framing (HTTP/1.1 chunked, or close-delimited for HTTP/1.0), batching (up to
//! `MAX_BATCH` queued frames go out in one `writev`, as one chunk, with no copy of any frame), the
//! clean end (`0\r\n\r\n`, then FIN, given up after `CLOSE_LINGER`), the abort on overflow (no
//! terminator), and noticing that the client left (EOF or error on read). It also owns
//! [`write_now`], the one `writev` a delivery makes itself when the stream is idle; which of the two
//! writes at any moment is decided under the stream's lock (see [`crate::stream`]). The task holds the [`StreamGuard`]; when the task ends, the
//! guard's drop reports `client_closed` unless the stream had already ended for another reason.
//! It must not decide when a stream ends; it only carries out what [`crate::stream`] says.

use std::future::Future;
use std::io::{ErrorKind, IoSlice};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::gateway::StreamGuard;
use crate::stream::Next;

/// Frames per `writev`: a burst of small events becomes one syscall; 16 + 2 iovecs stays far below
/// `IOV_MAX` and keeps the batch `Vec` at 512 B while it exists.
const MAX_BATCH: usize = 16;
static TERMINATOR: Bytes = Bytes::from_static(b"0\r\n\r\n");
/// How long a cleanly ended stream may take to flush its last frames and terminator. A client that
/// stopped reading would otherwise hold its socket (and queue) until TCP gives up, long after the
/// stream was reported closed.
const CLOSE_LINGER: Duration = Duration::from_secs(10);
const CRLF: &[u8] = b"\r\n";

pub struct StreamWriter {
    /// Shared with the stream (see [`Stream::attach`](crate::stream::Stream::attach)) so deliveries
    /// can write an idle stream's frame directly; who writes when is arbitrated there.
    socket: Arc<TcpStream>,
    guard: StreamGuard,
    chunked: bool,
    /// Frames being written; empty when idle (and then unallocated).
    batch: Vec<Bytes>,
    /// The chunk-size line of the batch (`<hex>\r\n`), empty for close-delimited bodies.
    prefix: [u8; 18],
    prefix_len: u8,
    suffix: &'static [u8],
    /// Bytes of prefix + batch + suffix already written.
    written: usize,
    finished: bool,
    /// Armed when the stream ends cleanly; boxed because almost no stream ever needs it.
    linger: Option<Pin<Box<Sleep>>>,
    /// Held, not read: shutdown waits until every holder (this writer included) is gone.
    _drain: watch::Receiver<bool>,
}

impl StreamWriter {
    pub fn new(
        socket: TcpStream,
        guard: StreamGuard,
        chunked: bool,
        drain: watch::Receiver<bool>,
    ) -> StreamWriter {
        let socket = Arc::new(socket);
        guard.stream.attach(socket.clone(), chunked);
        StreamWriter {
            socket,
            guard,
            chunked,
            batch: Vec::new(),
            prefix: [0; 18],
            prefix_len: 0,
            suffix: b"",
            written: 0,
            finished: false,
            linger: None,
            _drain: drain,
        }
    }

    fn pending(&self) -> usize {
        let frames: usize = self.batch.iter().map(Bytes::len).sum();
        self.prefix_len as usize + frames + self.suffix.len() - self.written
    }

    /// Frames the batch just taken from the queue.
    fn frame_batch(&mut self) {
        let len: usize = self.batch.iter().map(Bytes::len).sum();
        self.guard
            .gateway()
            .metrics
            .bytes_sent_total
            .fetch_add(len as u64, Relaxed);
        if self.chunked {
            self.prefix_len = write_chunk_size(len, &mut self.prefix);
            self.suffix = CRLF;
        } else {
            self.prefix_len = 0;
            self.suffix = b"";
        }
    }

    fn finish_batch(&mut self) {
        self.written = 0;
        self.prefix_len = 0;
        self.suffix = b"";
        if self.batch.capacity() > MAX_BATCH {
            self.batch = Vec::new();
        } else {
            self.batch.clear();
        }
    }

    /// Reads and discards whatever the client sends; true once it has closed or failed.
    fn client_gone(&mut self, cx: &mut Context<'_>) -> bool {
        let mut sink = [0u8; 64];
        // Bounded, so a client that streams bytes at us cannot keep this task spinning.
        for _ in 0..16 {
            match self.socket.poll_read_ready(cx) {
                Poll::Pending => return false,
                Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(())) => match self.socket.try_read(&mut sink) {
                    Ok(0) => return true,
                    Ok(_) => {}
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return true,
                },
            }
        }
        cx.waker().wake_by_ref();
        false
    }

    fn poll_write_batch(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_BATCH + 2];
        let mut count = 0;
        let pieces = std::iter::once(&self.prefix[..self.prefix_len as usize])
            .chain(self.batch.iter().map(|b| &b[..]))
            .chain(std::iter::once(self.suffix));
        for (piece, from) in unwritten(pieces, self.written) {
            slices[count] = IoSlice::new(&piece[from..]);
            count += 1;
        }
        let writes = &self.guard.gateway().metrics.socket_writes_total;
        loop {
            writes.fetch_add(1, Relaxed);
            match self.socket.try_write_vectored(&slices[..count]) {
                Err(err) if err.kind() == ErrorKind::WouldBlock => {
                    ready!(self.socket.poll_write_ready(cx))?;
                }
                done => return Poll::Ready(done),
            }
        }
    }
}

impl Future for StreamWriter {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.client_gone(cx) {
            return Poll::Ready(());
        }
        if let Some(linger) = &mut this.linger {
            if linger.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        loop {
            if this.pending() == 0 {
                if this.finished {
                    // FIN now, even if a delivery still holds a clone of the socket.
                    let _ = SockRef::from(&*this.socket).shutdown(Shutdown::Write);
                    return Poll::Ready(());
                }
                this.finish_batch();
                match this
                    .guard
                    .stream
                    .take_batch(&mut this.batch, MAX_BATCH, cx.waker())
                {
                    Next::Frames => this.frame_batch(),
                    // Already framed by the interrupted direct write, and already counted.
                    Next::Raw => {}
                    Next::Pending => return Poll::Pending,
                    Next::Finished => {
                        this.finished = true;
                        let mut linger = Box::pin(tokio::time::sleep(CLOSE_LINGER));
                        // Registers the timer; it fires at most once, after CLOSE_LINGER.
                        let _ = linger.as_mut().poll(cx);
                        this.linger = Some(linger);
                        if this.chunked {
                            this.batch.push(TERMINATOR.clone());
                        }
                        continue;
                    }
                    // Dropping the socket without the terminator: the client sees a broken body.
                    Next::Aborted => return Poll::Ready(()),
                }
            }
            match this.poll_write_batch(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(n)) => this.written += n,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        self.guard.stream.detach();
    }
}

/// Most frames [`write_now`] sends in one `writev` (a batch's frames for one stream, PROTOCOL §12):
/// 64 + 2 iovecs is ~1 KiB of stack and far below `IOV_MAX`.
pub const MAX_DIRECT_FRAMES: usize = 64;

/// Writes an idle stream's frames (at most [`MAX_DIRECT_FRAMES`]) straight to its socket from the
/// delivering task (see [`Delivery::Written`](crate::stream::Delivery::Written) and
/// [`Stream::flush`](crate::stream::Stream::flush)): one non-blocking `writev` of one chunk, its
/// header, the frames and CRLF. Returns what the socket did not take, already framed, for the
/// writer to finish; on any error everything is returned and the writer meets the error itself.
pub fn write_now(socket: &TcpStream, chunked: bool, frames: &[Bytes]) -> Vec<Bytes> {
    debug_assert!(!frames.is_empty() && frames.len() <= MAX_DIRECT_FRAMES);
    let len: usize = frames.iter().map(Bytes::len).sum();
    let mut header = [0u8; 18];
    let (header_len, suffix) = if chunked {
        (write_chunk_size(len, &mut header) as usize, CRLF)
    } else {
        (0, &b""[..])
    };
    let mut slices = [IoSlice::new(&[]); MAX_DIRECT_FRAMES + 2];
    slices[0] = IoSlice::new(&header[..header_len]);
    for (slot, frame) in slices[1..].iter_mut().zip(frames) {
        *slot = IoSlice::new(frame);
    }
    slices[frames.len() + 1] = IoSlice::new(suffix);
    let total = header_len + len + suffix.len();
    let written = socket
        .try_write_vectored(&slices[..frames.len() + 2])
        .unwrap_or(0);
    if written == total {
        return Vec::new();
    }
    let pieces = std::iter::once(Bytes::copy_from_slice(&header[..header_len]))
        .chain(frames.iter().cloned())
        .chain(std::iter::once(Bytes::from_static(suffix)));
    unwritten(pieces, written)
        .map(|(piece, from)| piece.slice(from..))
        .collect()
}

/// The pieces of a write not yet fully written after `written` bytes went out, each with the
/// offset its unwritten part starts at. Empty pieces are skipped.
fn unwritten<P: AsRef<[u8]>>(
    pieces: impl IntoIterator<Item = P>,
    mut written: usize,
) -> impl Iterator<Item = (P, usize)> {
    pieces.into_iter().filter_map(move |piece| {
        let len = piece.as_ref().len();
        if written >= len {
            written -= len;
            None
        } else {
            let from = std::mem::take(&mut written);
            Some((piece, from))
        }
    })
}

/// Writes `<len in hex>\r\n` into `out`; returns its length.
fn write_chunk_size(len: usize, out: &mut [u8; 18]) -> u8 {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = ((usize::BITS - len.leading_zeros()).div_ceil(4)).max(1) as usize;
    for i in 0..digits {
        out[digits - 1 - i] = HEX[(len >> (4 * i)) & 0xF];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    (digits + 2) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-stream budget in `registry.rs` depends on these sizes; a change should be deliberate.
    #[test]
    fn per_stream_state_stays_small() {
        let writer = std::mem::size_of::<StreamWriter>();
        let stream = std::mem::size_of::<crate::stream::Stream>();
        println!("StreamWriter {writer} B, Stream {stream} B");
        assert!(writer <= 160, "StreamWriter is {writer} B");
        // With its 16 B of `Arc` counts, 208 fills mimalloc's 224 B bin exactly.
        assert!(stream <= 208, "Stream is {stream} B");
    }

    /// A stream attached to the server end of a loopback connection, and the client end.
    async fn attached_stream() -> (crate::stream::Stream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let stream = crate::stream::Stream::new(crate::token::Token::random(), Bytes::new());
        stream.attach(Arc::new(server), true);
        (stream, client)
    }

    /// A delivery to an idle, attached stream writes the chunk itself; one bigger than the queue
    /// bound still overflows, as it would through the queue.
    #[tokio::test]
    async fn idle_streams_are_written_directly_and_the_bound_still_holds() {
        use crate::stream::Delivery;
        use tokio::io::AsyncReadExt;
        let (stream, mut client) = attached_stream().await;

        let frame = Bytes::from_static(b"data: hi\n\n");
        assert!(
            matches!(
                stream.deliver(Some(&frame), false, 64, 0),
                Delivery::Written
            ),
            "an idle attached stream is written directly"
        );
        let mut got = vec![0u8; 15];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"a\r\ndata: hi\n\n\r\n");
        // The stream is idle again: the next frame goes straight out too, the writer has nothing.
        let mut batch = Vec::new();
        assert!(matches!(
            stream.deliver(Some(&frame), false, 64, 0),
            Delivery::Written
        ));
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(
            stream.take_batch(&mut batch, 16, std::task::Waker::noop()),
            Next::Pending
        );
        let big = Bytes::from(vec![b'x'; 65]);
        assert!(matches!(
            stream.deliver(Some(&big), false, 64, 0),
            Delivery::Overflowed
        ));
    }

    /// A batch's deferred frames for one idle stream go out as one chunk in one write.
    #[tokio::test]
    async fn a_flush_writes_the_deferred_frames_as_one_chunk() {
        use crate::stream::Delivery;
        use tokio::io::AsyncReadExt;
        let (stream, mut client) = attached_stream().await;
        for frame in ["data: 1\n\n", "data: 2\n\n", "data: 3\n\n"] {
            assert!(matches!(
                stream.defer(&Bytes::from_static(frame.as_bytes()), 27, 0),
                Ok(Delivery::Queued { ended: false })
            ));
        }
        // A fourth would pass the bound, but the queue can be written now: no overflow yet.
        let more = Bytes::from_static(b"data: 4\n\n");
        assert!(stream.defer(&more, 27, 0).is_err());
        assert_eq!(stream.flush(&mut Vec::new()), Some(27));
        let mut got = vec![0u8; 33];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"1b\r\ndata: 1\n\ndata: 2\n\ndata: 3\n\n\r\n");
        assert_eq!(stream.flush(&mut Vec::new()), None, "nothing left");
        assert!(matches!(
            stream.defer(&more, 27, 0),
            Ok(Delivery::Queued { ended: false })
        ));
    }

    #[test]
    fn unwritten_skips_whole_pieces_and_splits_the_partial_one() {
        let pieces: [&[u8]; 4] = [b"3\r\n", b"", b"abc", b"\r\n"];
        let rest = |written| -> Vec<(Vec<u8>, usize)> {
            unwritten(pieces, written)
                .map(|(p, from)| (p.to_vec(), from))
                .collect()
        };
        assert_eq!(rest(0).len(), 3, "the empty piece is skipped");
        assert_eq!(rest(4), vec![(b"abc".to_vec(), 1), (b"\r\n".to_vec(), 0)]);
        assert_eq!(rest(6), vec![(b"\r\n".to_vec(), 0)]);
        assert!(rest(8).is_empty());
    }

    #[test]
    fn chunk_sizes_are_lower_hex() {
        let size = |n| {
            let mut out = [0; 18];
            let len = write_chunk_size(n, &mut out) as usize;
            String::from_utf8(out[..len].to_vec()).unwrap()
        };
        assert_eq!(size(1), "1\r\n");
        assert_eq!(size(15), "f\r\n");
        assert_eq!(size(16), "10\r\n");
        assert_eq!(size(0x1_0000), "10000\r\n");
        assert_eq!(size(usize::MAX), "ffffffffffffffff\r\n");
    }
}
