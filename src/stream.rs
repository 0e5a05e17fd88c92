//! Streams: one open SSE stream's byte-bounded frame queue and its end state.
//!
//! Owns what happens to frames between "accepted by the gateway" and "taken by the stream's writer":
//! the FIFO of shared [`Bytes`] frames, the `MAX_QUEUE_BYTES` bound, the waker of the writer task
//! that drains it, and the single transition to "ended" that decides which disconnect reason is
//! reported (so exactly one is). It does no I/O and sends no callbacks: whoever makes the transition
//! (see [`crate::gateway`]) reports it. Locks here are short and never held across `.await`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Waker;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::channels::Membership;
use crate::frame;
use crate::token::Token;

/// Why a stream ended; the names are the disconnect callback's `reason`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    ClientClosed,
    ServerClosed,
    Error,
}

impl EndReason {
    pub const ALL: [EndReason; 3] = [
        EndReason::ClientClosed,
        EndReason::ServerClosed,
        EndReason::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::ClientClosed => "client_closed",
            EndReason::ServerClosed => "server_closed",
            EndReason::Error => "error",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

pub struct Stream {
    pub token: Token,
    /// The connect callback's `request` object, pre-serialised once; the disconnect callback reuses it.
    pub request: Bytes,
    /// Set once the connect callback answered 2xx; until then the token is reserved but not open.
    accepted: AtomicBool,
    state: Mutex<State>,
    /// Channels this stream is in; owned by [`crate::channels`], locked before any channel shard.
    pub(crate) memberships: Mutex<Vec<Membership>>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    queued_bytes: usize,
    /// The connection task parked in [`Stream::poll_next`].
    waker: Option<Waker>,
    end: Option<EndReason>,
}

/// What [`Stream::deliver`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued; `ended` is true when this call also ended the stream (`close: true`).
    Queued { ended: bool },
    /// Nothing queued and no transition: the stream had already ended.
    AlreadyEnded,
    /// The frame would have overflowed the queue: the stream is now ended with [`EndReason::Error`]
    /// and its queue dropped.
    Overflowed,
}

/// Ring capacity an emptied queue may keep (4 × 32 B); a larger one is freed.
const IDLE_QUEUE_CAPACITY: usize = 4;

/// What the stream's writer should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Frames were moved into the caller's batch.
    Frames,
    /// Park; the waker is stored and the next delivery wakes it.
    Pending,
    /// The stream ended cleanly and everything queued was taken: finish the chunked body.
    Finished,
    /// Abort the response (queue overflow): the client must not see a clean end.
    Aborted,
}

impl Stream {
    pub fn new(token: Token, request: Bytes) -> Stream {
        Stream {
            token,
            request,
            accepted: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            memberships: Mutex::new(Vec::new()),
        }
    }

    pub fn accept(&self) {
        self.accepted.store(true, Ordering::SeqCst);
    }

    pub fn has_ended(&self) -> bool {
        self.state.lock().end.is_some()
    }

    /// Whether the stream is open to sends (its connect callback answered 2xx).
    pub fn is_accepted(&self) -> bool {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Queues `frame` (if any) and, with `close`, ends the stream cleanly after it; both in one lock so
    /// no other frame can land between the event and the end.
    pub fn deliver(&self, frame: Option<&Bytes>, close: bool, max_queue_bytes: usize) -> Delivery {
        let mut state = self.state.lock();
        if state.end.is_some() {
            return Delivery::AlreadyEnded;
        }
        if let Some(frame) = frame {
            if state.queued_bytes + frame.len() > max_queue_bytes {
                state.end = Some(EndReason::Error);
                state.queue = VecDeque::new();
                state.queued_bytes = 0;
                let waker = state.waker.take();
                drop(state);
                wake(waker);
                return Delivery::Overflowed;
            }
            state.queued_bytes += frame.len();
            state.queue.push_back(frame.clone());
        }
        if close {
            state.end = Some(EndReason::ServerClosed);
        }
        let waker = state.waker.take();
        drop(state);
        wake(waker);
        Delivery::Queued { ended: close }
    }

    /// Queues a heartbeat if the stream is idle (nothing queued). A stream with frames waiting is
    /// demonstrably alive, and skipping it is what keeps heartbeats from ever overflowing a queue.
    /// `None` when skipped; else the parked waker (if any), to wake once the caller has released
    /// its own locks.
    pub fn heartbeat(&self) -> Option<Option<Waker>> {
        let mut state = self.state.lock();
        if state.end.is_some() || !state.queue.is_empty() {
            return None;
        }
        state.queue.push_back(frame::HEARTBEAT.clone());
        state.queued_bytes += frame::HEARTBEAT.len();
        Some(state.waker.take())
    }

    /// Ends the stream for `reason` unless it has ended already; true when this call made the
    /// transition and so owns reporting it. A clean end lets queued frames drain first; an error end
    /// drops them.
    pub fn end(&self, reason: EndReason) -> bool {
        let mut state = self.state.lock();
        if state.end.is_some() {
            return false;
        }
        state.end = Some(reason);
        if reason == EndReason::Error {
            state.queue = VecDeque::new();
            state.queued_bytes = 0;
        }
        let waker = state.waker.take();
        drop(state);
        wake(waker);
        true
    }

    /// Called by the stream's writer: moves up to `max` queued frames into `out` (in order), or parks
    /// `waker` when there are none. Taking a batch lets one `writev` carry a burst of frames.
    pub fn take_batch(&self, out: &mut Vec<Bytes>, max: usize, waker: &Waker) -> Next {
        let mut state = self.state.lock();
        if !state.queue.is_empty() {
            let state = &mut *state;
            let n = state.queue.len().min(max);
            for frame in state.queue.drain(..n) {
                state.queued_bytes -= frame.len();
                out.push(frame);
            }
            if state.queue.is_empty() && state.queue.capacity() > IDLE_QUEUE_CAPACITY {
                // A burst grew the ring; an idle stream should not keep paying for it.
                state.queue = VecDeque::new();
            }
            return Next::Frames;
        }
        match state.end {
            None => {
                match &mut state.waker {
                    Some(w) if w.will_wake(waker) => {}
                    slot => *slot = Some(waker.clone()),
                }
                Next::Pending
            }
            Some(EndReason::Error) => Next::Aborted,
            Some(_) => Next::Finished,
        }
    }

    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().queued_bytes
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn stream() -> Stream {
        Stream::new(Token::random(), Bytes::from_static(b"{}"))
    }

    fn frame(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn take(s: &Stream) -> Vec<Bytes> {
        let mut out = Vec::new();
        while s.take_batch(&mut out, 1, Waker::noop()) == Next::Frames {}
        out
    }

    #[test]
    fn frames_drain_in_order_then_a_clean_end() {
        let s = stream();
        assert_eq!(
            s.deliver(Some(&frame("a")), false, 100),
            Delivery::Queued { ended: false }
        );
        assert_eq!(
            s.deliver(Some(&frame("b")), true, 100),
            Delivery::Queued { ended: true }
        );
        assert_eq!(
            s.deliver(Some(&frame("c")), false, 100),
            Delivery::AlreadyEnded
        );
        assert_eq!(take(&s), vec![frame("a"), frame("b")]);
        assert!(s.take_batch(&mut Vec::new(), 8, Waker::noop()) == Next::Finished);
        assert!(!s.end(EndReason::ClientClosed), "the end is reported once");
    }

    #[test]
    fn overflow_drops_the_queue_and_aborts() {
        let s = stream();
        assert_eq!(
            s.deliver(Some(&frame("12345")), false, 8),
            Delivery::Queued { ended: false }
        );
        assert_eq!(
            s.deliver(Some(&frame("6789")), false, 8),
            Delivery::Overflowed
        );
        assert_eq!(s.queued_bytes(), 0);
        assert!(s.take_batch(&mut Vec::new(), 8, Waker::noop()) == Next::Aborted);
        assert!(!s.end(EndReason::ClientClosed));
    }

    #[test]
    fn heartbeats_only_fill_idle_queues() {
        let s = stream();
        s.heartbeat();
        s.heartbeat();
        assert_eq!(take(&s), vec![frame::HEARTBEAT.clone()]);
        s.deliver(Some(&frame("x")), false, 100);
        s.heartbeat();
        assert_eq!(take(&s), vec![frame("x")]);
        assert!(s.take_batch(&mut Vec::new(), 8, Waker::noop()) == Next::Pending);
    }

    #[test]
    fn an_exact_fit_is_not_an_overflow() {
        let s = stream();
        assert_eq!(
            s.deliver(Some(&frame("1234")), false, 8),
            Delivery::Queued { ended: false }
        );
        assert_eq!(
            s.deliver(Some(&frame("5678")), false, 8),
            Delivery::Queued { ended: false }
        );
    }
}
