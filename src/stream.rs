//! Streams: one open SSE stream's byte-bounded frame queue and its end state.
//!
//! Owns what happens to frames between "accepted by the gateway" and "taken by the stream's writer":
//! the FIFO of shared [`Bytes`] frames, the `MAX_QUEUE_BYTES` bound, the waker of the writer task
//! that drains it, and the single transition to "ended" that decides which disconnect reason is
//! reported (so exactly one is), and who may write to the socket right now: the writer task, or a
//! delivery writing an idle stream's frame itself. It sends no callbacks: whoever makes a transition
//! (see [`crate::gateway`]) reports it. Its only I/O is handing an idle stream's frame to
//! [`writer::write_now`] outside its lock; the bytes on the wire are the writer module's business.
//! Locks here are short and never held across `.await`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Waker;

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use tokio::net::TcpStream;

use crate::channels::Memberships;
use crate::token::Token;
use crate::{frame, history, writer};

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
    pub(crate) memberships: Mutex<Memberships>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    /// Bytes of an interrupted direct write, already framed: written before anything in `queue`.
    raw: Vec<Bytes>,
    /// `queue` and `raw` together.
    queued_bytes: usize,
    /// The writer task parked in [`Stream::take_batch`].
    waker: Option<Waker>,
    end: Option<EndReason>,
    /// The socket, once the writer owns it; shared so a delivery can write without a task switch.
    socket: Option<Arc<TcpStream>>,
    chunked: bool,
    /// Who is writing to the socket right now; at most one party at a time.
    writing: Writing,
    /// Set by a catch-up (PROTOCOL §11) until the first published frame after it arrives:
    /// which late frames (their fan-out listed this stream before the catch-up) it already holds.
    /// Boxed: a stream pays one pointer for it, and without history never more.
    caught_up: Option<Box<CaughtUp>>,
}

/// What a catch-up queued: everything up to `after`, and of what followed up to `through`, the
/// positions in `held` (sorted).
struct CaughtUp {
    after: u64,
    through: u64,
    held: Vec<u64>,
}

impl State {
    /// The socket, when a delivery may write to it itself now: attached, nobody writing, and
    /// nothing left of an interrupted write that would have to go first.
    fn idle_socket(&self) -> Option<Arc<TcpStream>> {
        if self.writing == Writing::Idle && self.raw.is_empty() {
            self.socket.clone()
        } else {
            None
        }
    }

    /// Whether a published frame at `seq` is one the stream's catch-up already queued; the
    /// first later one ends the check.
    fn replayed(&mut self, seq: u64) -> bool {
        let Some(caught_up) = self.caught_up.as_deref().filter(|_| seq != 0) else {
            return false;
        };
        if seq > caught_up.through {
            self.caught_up = None;
            return false;
        }
        seq <= caught_up.after || caught_up.held.binary_search(&seq).is_ok()
    }

    /// Moves up to `max` queued frames, in order, into `out`; returns their bytes. A ring that a
    /// burst grew is freed once emptied: an idle stream should not keep paying for it.
    fn take_frames(&mut self, out: &mut Vec<Bytes>, max: usize) -> usize {
        let n = self.queue.len().min(max);
        let mut len = 0;
        for frame in self.queue.drain(..n) {
            len += frame.len();
            out.push(frame);
        }
        self.queued_bytes -= len;
        if self.queue.is_empty() && self.queue.capacity() > IDLE_QUEUE_CAPACITY {
            self.queue = VecDeque::new();
        }
        len
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Writing {
    #[default]
    Idle,
    /// The writer task has a batch in flight.
    Task,
    /// A delivery is writing its frame directly (see [`Delivery::Direct`]).
    Direct,
}

/// What [`Stream::deliver`] did.
pub enum Delivery {
    /// Queued; `ended` is true when this call also ended the stream (`close: true`).
    Queued { ended: bool },
    /// The stream was idle, so the frame was written straight to its socket from the delivering
    /// task (what the socket did not take went to the writer). Saves waking and polling the writer
    /// task, and keeps a fan-out's writes inside the publishing task instead of queueing 18k tasks
    /// ahead of everyone else.
    Written,
    /// Nothing queued and no transition: the stream had already ended.
    AlreadyEnded,
    /// Nothing queued: the stream's replay already carried this published frame.
    Replayed,
    /// The frame would have overflowed the queue: the stream is now ended with [`EndReason::Error`]
    /// and its queue dropped.
    Overflowed,
}

/// [`Stream::defer`]: the queue is full of frames that a [`Stream::flush`] can write now.
#[derive(Debug)]
pub struct Full;

/// Ring capacity an emptied queue may keep (4 × 32 B); a larger one is freed.
const IDLE_QUEUE_CAPACITY: usize = 4;

/// What the stream's writer should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Frames were moved into the caller's batch.
    Frames,
    /// The rest of an interrupted direct write was moved into the batch: already framed, write as is.
    Raw,
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
            memberships: Mutex::new(Memberships::default()),
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
    /// no other frame can land between the event and the end. `seq` is a published frame's
    /// position with history on, else 0.
    pub fn deliver(
        &self,
        frame: Option<&Bytes>,
        close: bool,
        max_queue_bytes: usize,
        seq: u64,
    ) -> Delivery {
        let mut state = self.state.lock();
        if state.end.is_some() {
            return Delivery::AlreadyEnded;
        }
        // A replayed frame is not queued again, but its `close` still ends the stream.
        let replayed = state.replayed(seq);
        if replayed && !close {
            return Delivery::Replayed;
        }
        if let Some(frame) = frame.filter(|_| !replayed) {
            if !close && state.queue.is_empty() && frame.len() <= max_queue_bytes {
                if let Some(socket) = state.idle_socket() {
                    self.write_directly(state, &socket, std::slice::from_ref(frame));
                    return Delivery::Written;
                }
            }
            if state.queued_bytes + frame.len() > max_queue_bytes {
                return overflow(state);
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

    /// Queues `frame` without writing it and without waking the writer: a batch's delivery
    /// (PROTOCOL §12), so that every frame the batch has for this stream can go out in one write
    /// at [`Stream::flush`], which the batch must call once it is done queueing. The bound and the
    /// overflow are as in [`Stream::deliver`], with one step before the overflow: when the frames
    /// filling the queue could be written now (nobody is writing), the answer is [`Full`] and
    /// nothing changes; the caller flushes and tries again, as separate requests would have been
    /// written and not have overflowed. Never [`Delivery::Written`].
    pub fn defer(&self, frame: &Bytes, max_queue_bytes: usize, seq: u64) -> Result<Delivery, Full> {
        let mut state = self.state.lock();
        if state.end.is_some() {
            return Ok(Delivery::AlreadyEnded);
        }
        if state.replayed(seq) {
            return Ok(Delivery::Replayed);
        }
        if state.queued_bytes + frame.len() > max_queue_bytes {
            if !state.queue.is_empty() && state.idle_socket().is_some() {
                return Err(Full);
            }
            return Ok(overflow(state));
        }
        state.queued_bytes += frame.len();
        state.queue.push_back(frame.clone());
        Ok(Delivery::Queued { ended: false })
    }

    /// Sends what [`Stream::defer`] queued: when nobody is writing, up to
    /// [`writer::MAX_DIRECT_FRAMES`] queued frames go out from the calling task in one `writev`
    /// (the rest, and what the socket did not take, go to the writer); otherwise the writer is
    /// woken and takes them in its own batches. Returns the frame bytes written directly, if any.
    pub fn flush(&self, scratch: &mut Vec<Bytes>) -> Option<usize> {
        let mut state = self.state.lock();
        if state.queue.is_empty() {
            // Taken by the writer already, or dropped by an error end.
            return None;
        }
        if state.end.is_none() {
            if let Some(socket) = state.idle_socket() {
                scratch.clear();
                let len = state.take_frames(scratch, writer::MAX_DIRECT_FRAMES);
                self.write_directly(state, &socket, scratch);
                scratch.clear();
                return Some(len);
            }
        }
        let waker = state.waker.take();
        drop(state);
        wake(waker);
        None
    }

    /// Catches a stream up before it is accepted (PROTOCOL §11): `first` (a replay of what its
    /// channels kept after position `after`, oldest first, or a gap event at `after`; each frame
    /// with the seq it sorts by) and what its channels
    /// delivered since it joined them become one queue in position order, each position once;
    /// frames at or before `after` are dropped, now and when they arrive late, as are late
    /// copies of what is queued up to `through` (the history's position at the snapshot).
    /// Frames without a position (heartbeats) keep to the end. Called while no writer has taken
    /// anything. False, changing nothing, when it all would not fit in `max_queue_bytes`.
    pub fn catch_up(&self, first: Vec<(u64, Bytes)>, after: u64, through: u64, max: usize) -> bool {
        let mut state = self.state.lock();
        // A clean end (a closing publish that raced the catch-up) still drains the queue: the
        // replay goes before its frame. After any other end nobody will read it.
        if state.end.is_some_and(|end| end != EndReason::ServerClosed) {
            return true;
        }
        let mut ordered = first;
        let mut rest = Vec::new();
        for frame in &state.queue {
            match history::position_of(frame).map(|p| p.seq) {
                Some(at) if at <= after => {}
                Some(at) => ordered.push((at, frame.clone())),
                None => rest.push(frame.clone()),
            }
        }
        // Stable: a position both replayed and delivered keeps the replay's copy.
        ordered.sort_by_key(|(at, _)| *at);
        ordered.dedup_by_key(|(at, _)| *at);
        let bytes = ordered.iter().map(|(_, f)| f.len()).sum::<usize>()
            + rest.iter().map(Bytes::len).sum::<usize>();
        if bytes > max {
            return false;
        }
        let held = ordered
            .iter()
            .map(|(at, _)| *at)
            .filter(|at| *at > after && *at <= through)
            .collect();
        state.queue = ordered.into_iter().map(|(_, f)| f).chain(rest).collect();
        state.queued_bytes = bytes;
        state.caught_up = Some(Box::new(CaughtUp {
            after,
            through,
            held,
        }));
        true
    }

    /// Queues a heartbeat if the stream is idle (nothing queued). A stream with frames waiting is
    /// demonstrably alive, and skipping it is what keeps heartbeats from ever overflowing a queue.
    /// `None` when skipped; else the parked waker (if any), to wake once the caller has released
    /// its own locks.
    pub fn heartbeat(&self) -> Option<Option<Waker>> {
        let mut state = self.state.lock();
        if state.end.is_some()
            || !state.queue.is_empty()
            || !state.raw.is_empty()
            || state.writing != Writing::Idle
        {
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
            state.raw = Vec::new();
            state.queued_bytes = 0;
        }
        let waker = state.waker.take();
        drop(state);
        wake(waker);
        true
    }

    /// Called by the stream's writer: moves up to `max` queued frames into `out` (in order), or parks
    /// `waker` when there are none. Taking a batch lets one `writev` carry a burst of frames.
    /// The writer calls this only with nothing of its own in flight, so it gives up any claim here.
    pub fn take_batch(&self, out: &mut Vec<Bytes>, max: usize, waker: &Waker) -> Next {
        let mut state = self.state.lock();
        let state = &mut *state;
        if state.writing == Writing::Direct {
            // A delivery is writing; `end_direct` wakes us when it is done.
            park(&mut state.waker, waker);
            return Next::Pending;
        }
        state.writing = Writing::Idle;
        if !state.raw.is_empty() {
            for piece in state.raw.drain(..) {
                state.queued_bytes -= piece.len();
                out.push(piece);
            }
            state.writing = Writing::Task;
            return Next::Raw;
        }
        if !state.queue.is_empty() {
            state.take_frames(out, max);
            state.writing = Writing::Task;
            return Next::Frames;
        }
        match state.end {
            None => {
                park(&mut state.waker, waker);
                Next::Pending
            }
            Some(EndReason::Error) => Next::Aborted,
            Some(_) => Next::Finished,
        }
    }

    /// Writes `frames` (already taken from the queue, or never queued) from the calling task,
    /// holding the right to write for the time of the `writev`, not the lock.
    fn write_directly(
        &self,
        mut state: MutexGuard<'_, State>,
        socket: &TcpStream,
        frames: &[Bytes],
    ) {
        state.writing = Writing::Direct;
        let chunked = state.chunked;
        drop(state);
        let unwritten = writer::write_now(socket, chunked, frames);
        self.end_direct(unwritten);
    }

    /// Gives back the right to write taken for a direct write, with the bytes the socket did not
    /// take (already framed; empty when the whole frame went out). Wakes the writer if there is
    /// work for it: those bytes, frames queued meanwhile, or an end to carry out.
    fn end_direct(&self, unwritten: Vec<Bytes>) {
        let mut state = self.state.lock();
        state.writing = Writing::Idle;
        if state.end != Some(EndReason::Error) {
            state.queued_bytes += unwritten.iter().map(Bytes::len).sum::<usize>();
            state.raw = unwritten;
        }
        let work = !state.raw.is_empty() || !state.queue.is_empty() || state.end.is_some();
        let waker = if work { state.waker.take() } else { None };
        drop(state);
        wake(waker);
    }

    /// The writer took the socket over from hyper: deliveries may now write to it directly.
    pub fn attach(&self, socket: Arc<TcpStream>, chunked: bool) {
        let mut state = self.state.lock();
        state.socket = Some(socket);
        state.chunked = chunked;
    }

    /// The writer is ending: no more direct writes, and the socket closes once in-flight ones end.
    pub fn detach(&self) {
        self.state.lock().socket = None;
    }

    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().queued_bytes
    }
}

/// Ends the stream for a frame that would pass `MAX_QUEUE_BYTES`: its queue is dropped, and the
/// writer woken to abort the response.
fn overflow(mut state: MutexGuard<'_, State>) -> Delivery {
    state.end = Some(EndReason::Error);
    state.queue = VecDeque::new();
    state.queued_bytes = 0;
    let waker = state.waker.take();
    drop(state);
    wake(waker);
    Delivery::Overflowed
}

fn park(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        slot => *slot = Some(waker.clone()),
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
        assert!(matches!(
            s.deliver(Some(&frame("a")), false, 100, 0),
            Delivery::Queued { ended: false }
        ));
        assert!(matches!(
            s.deliver(Some(&frame("b")), true, 100, 0),
            Delivery::Queued { ended: true }
        ));
        assert!(matches!(
            s.deliver(Some(&frame("c")), false, 100, 0),
            Delivery::AlreadyEnded
        ));
        assert_eq!(take(&s), vec![frame("a"), frame("b")]);
        assert!(s.take_batch(&mut Vec::new(), 8, Waker::noop()) == Next::Finished);
        assert!(!s.end(EndReason::ClientClosed), "the end is reported once");
    }

    #[test]
    fn overflow_drops_the_queue_and_aborts() {
        let s = stream();
        assert!(matches!(
            s.deliver(Some(&frame("12345")), false, 8, 0),
            Delivery::Queued { ended: false }
        ));
        assert!(matches!(
            s.deliver(Some(&frame("6789")), false, 8, 0),
            Delivery::Overflowed
        ));
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
        s.deliver(Some(&frame("x")), false, 100, 0);
        s.heartbeat();
        assert_eq!(take(&s), vec![frame("x")]);
        assert!(s.take_batch(&mut Vec::new(), 8, Waker::noop()) == Next::Pending);
    }

    #[test]
    fn deferred_frames_wait_for_the_flush_and_keep_their_order() {
        let s = stream();
        s.deliver(Some(&frame("a")), false, 100, 0);
        assert!(matches!(
            s.defer(&frame("b"), 100, 0),
            Ok(Delivery::Queued { ended: false })
        ));
        // No socket to flush to: the overflow is at once.
        assert!(matches!(
            s.defer(&frame("cc"), 3, 0),
            Ok(Delivery::Overflowed)
        ));
        assert!(matches!(
            s.defer(&frame("d"), 100, 0),
            Ok(Delivery::AlreadyEnded)
        ));
        assert!(s.take_batch(&mut Vec::new(), 8, Waker::noop()) == Next::Aborted);

        let s = stream();
        s.defer(&frame("a"), 100, 0).unwrap();
        s.defer(&frame("b"), 100, 0).unwrap();
        // No socket attached: the flush leaves them to the writer, in order.
        assert_eq!(s.flush(&mut Vec::new()), None);
        assert_eq!(take(&s), vec![frame("a"), frame("b")]);
        assert_eq!(s.flush(&mut Vec::new()), None, "nothing left to flush");
    }

    #[test]
    fn an_exact_fit_is_not_an_overflow() {
        let s = stream();
        assert!(matches!(
            s.deliver(Some(&frame("1234")), false, 8, 0),
            Delivery::Queued { ended: false }
        ));
        assert!(matches!(
            s.deliver(Some(&frame("5678")), false, 8, 0),
            Delivery::Queued { ended: false }
        ));
    }

    fn at(seq: u64) -> Bytes {
        let position = history::Position {
            epoch: 7,
            seq,
            ms: 1,
        };
        history::frame(&position, &crate::frame::Event::default())
    }

    /// A replay of the frames at `seqs`, as the history hands it over.
    fn replay(seqs: &[u64]) -> Vec<(u64, Bytes)> {
        seqs.iter().map(|&seq| (seq, at(seq))).collect()
    }

    #[test]
    fn a_catch_up_puts_the_replay_first_and_each_position_once() {
        let s = stream();
        assert!(s.heartbeat().is_some());
        // Delivered live between the join and the history snapshot: 5 is in the replay too, 1 is
        // at or before the position the stream came back with.
        for seq in [1, 5, 8] {
            s.deliver(Some(&at(seq)), false, 1 << 20, seq);
        }
        assert!(s.catch_up(replay(&[3, 4, 5]), 2, 6, 1 << 20));
        // Late copies of what the catch-up holds (their fan-out listed the stream before it),
        // and anything at or before the position, are dropped until a later position arrives;
        // per-token frames (seq 0) always pass.
        for seq in [4, 2] {
            assert!(matches!(
                s.deliver(Some(&at(seq)), false, 1 << 20, seq),
                Delivery::Replayed
            ));
        }
        s.deliver(Some(&frame("send")), false, 1 << 20, 0);
        s.deliver(Some(&at(9)), false, 1 << 20, 9);
        s.deliver(Some(&at(2)), false, 1 << 20, 2);
        let want = vec![
            at(3),
            at(4),
            at(5),
            at(8),
            crate::frame::HEARTBEAT.clone(),
            frame("send"),
            at(9),
            at(2),
        ];
        assert_eq!(s.queued_bytes(), want.iter().map(Bytes::len).sum::<usize>());
        assert_eq!(take(&s), want);
    }

    #[test]
    fn a_late_frame_the_replay_did_not_hold_is_delivered() {
        let s = stream();
        assert!(s.catch_up(replay(&[3]), 2, 5, 1 << 20));
        assert!(matches!(
            s.deliver(Some(&at(4)), false, 1 << 20, 4),
            Delivery::Queued { .. }
        ));
        assert_eq!(take(&s), vec![at(3), at(4)]);
    }

    #[test]
    fn a_gap_drops_everything_up_to_its_position() {
        let s = stream();
        s.deliver(Some(&at(4)), false, 1 << 20, 4);
        s.deliver(Some(&at(7)), false, 1 << 20, 7);
        assert!(s.catch_up(vec![(5, frame("gap"))], 5, 5, 1 << 20));
        assert!(matches!(
            s.deliver(Some(&at(5)), false, 1 << 20, 5),
            Delivery::Replayed
        ));
        assert_eq!(take(&s), vec![frame("gap"), at(7)]);
    }

    #[test]
    fn a_replay_past_the_queue_bound_changes_nothing() {
        let s = stream();
        s.deliver(Some(&at(8)), false, 1 << 20, 8);
        let bound = at(8).len() + at(3).len();
        assert!(!s.catch_up(replay(&[3, 4]), 2, 6, bound));
        assert!(s.catch_up(replay(&[3]), 2, 6, bound));
        assert_eq!(take(&s), vec![at(3), at(8)]);
    }

    #[test]
    fn a_closing_frame_keeps_its_close_when_replayed_and_a_clean_end_keeps_the_replay() {
        let s = stream();
        assert!(s.catch_up(replay(&[3, 4]), 2, 4, 1 << 20));
        assert!(matches!(
            s.deliver(Some(&at(4)), true, 1 << 20, 4),
            Delivery::Queued { ended: true }
        ));
        assert_eq!(take(&s), vec![at(3), at(4)]);

        // The closing publish arrived between the join and the resume.
        let s = stream();
        s.deliver(Some(&at(9)), true, 1 << 20, 9);
        assert!(s.catch_up(replay(&[7, 8]), 6, 8, 1 << 20));
        assert_eq!(take(&s), vec![at(7), at(8), at(9)]);
    }
}
