//! The single node's history: every channel's kept events in this process (PROTOCOL §11).
//!
//! Owns the deployment's publish order on one node (the position counter and its epoch, random
//! per process so that a restart's positions never pass for the earlier life's), and the three
//! bounds: `HISTORY_SIZE` per channel, `HISTORY_TTL_SECONDS`, and `HISTORY_MAX_BYTES` for all
//! channels together, oldest dropped first across channels. A kept event is the very frame the
//! publish delivered (a refcount, no copy per channel or per stream). It does not deliver and
//! does not decide gaps: a resume takes a [`Kept`] snapshot here and [`super::resolve`] decides.
//!
//! Bytes are counted as the frame plus a fixed overhead per kept entry and per channel, so the
//! bound holds for 100k channels of tiny events as well as for a few channels of large ones.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;

use super::{Kept, Now, Position};
use crate::channels::ProcessHasher;
use crate::frame::Event;

/// What one kept (channel, event) costs besides the frame: its ring slot (40 B) and its slot in
/// the global order (32 B), each up to twice over in a ring that doubles, and the frame's shared
/// header once it is cloned (32 B). Measured against RSS in BENCHMARKS.md §10.
pub const ENTRY_OVERHEAD: usize = 176;
/// What one channel's history costs besides its name: its map entry (56 B, in a table that is at
/// most 7/8 full and doubles), the ring's first slots, the `Arc<str>` header and allocator slack.
pub const CHANNEL_OVERHEAD: usize = 320;

/// A kept frame's bytes as the allocator holds them: mimalloc rounds a block up to its size class,
/// up to a quarter more.
fn frame_cost(frame: &Bytes) -> usize {
    frame.len() + frame.len() / 4
}

pub struct Store {
    inner: Mutex<Inner>,
    size: usize,
    ttl: Duration,
    max_bytes: usize,
    epoch: u32,
    /// `inner.bytes`, readable without the lock (the metrics gauge).
    bytes: AtomicUsize,
    /// Held by a publish from its position to the end of its fan-out, so that every stream gets
    /// events in position order: a stream that saw position `n` has seen every earlier event of
    /// its channels, which is what makes `Last-Event-ID` one number for all of them.
    pub order: tokio::sync::Mutex<()>,
}

struct Inner {
    last: Position,
    channels: HashMap<Arc<str>, Ring, ProcessHasher>,
    /// Every kept (channel, event), in position order: the oldest across channels is at the front.
    /// Entries that `HISTORY_SIZE` already dropped from their ring stay here until they come to
    /// the front (their overhead stays counted until then).
    order: VecDeque<Slot>,
    bytes: usize,
    forgotten_through: u64,
}

struct Slot {
    seq: u64,
    ms: u64,
    channel: Arc<str>,
}

struct Ring {
    entries: VecDeque<(u64, Bytes)>,
    floor: u64,
}

impl Store {
    pub fn new(size: usize, ttl: Duration, max_bytes: usize) -> Store {
        let mut epoch = [0u8; 4];
        getrandom::getrandom(&mut epoch).expect("the OS CSPRNG is available");
        let epoch = u32::from_le_bytes(epoch);
        Store {
            inner: Mutex::new(Inner {
                last: Position {
                    epoch,
                    seq: 0,
                    ms: now_ms(),
                },
                channels: HashMap::default(),
                order: VecDeque::new(),
                bytes: 0,
                forgotten_through: 0,
            }),
            size,
            ttl,
            max_bytes,
            epoch,
            bytes: AtomicUsize::new(0),
            order: tokio::sync::Mutex::new(()),
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Gives `event` the next position, keeps its frame in each of `names` (each once), and
    /// returns the frame to deliver.
    pub fn record(&self, names: &[&str], event: &Event<'_>) -> (Position, Bytes) {
        let mut inner = self.inner.lock();
        let now = now_ms().max(inner.last.ms);
        let position = Position {
            epoch: self.epoch,
            seq: inner.last.seq + 1,
            ms: now,
        };
        inner.last = position;
        let frame = super::frame(&position, event);
        let inner = &mut *inner;
        for &name in names {
            let (channel, ring) = match inner.channels.get_key_value(name) {
                Some((channel, _)) => (channel.clone(), inner.channels.get_mut(name)),
                None => {
                    let channel: Arc<str> = Arc::from(name);
                    inner.bytes += CHANNEL_OVERHEAD + name.len();
                    inner.channels.insert(
                        channel.clone(),
                        Ring {
                            // One slot first: most channels keep few events at a time.
                            entries: VecDeque::with_capacity(1),
                            floor: 0,
                        },
                    );
                    (channel.clone(), inner.channels.get_mut(name))
                }
            };
            let ring = ring.expect("present: found or inserted above");
            if ring
                .entries
                .back()
                .is_some_and(|(seq, _)| *seq == position.seq)
            {
                // Named twice in one publish: kept once.
                continue;
            }
            ring.entries.push_back((position.seq, frame.clone()));
            inner.bytes += frame_cost(&frame) + ENTRY_OVERHEAD;
            if ring.entries.len() > self.size {
                let (seq, dropped) = ring.entries.pop_front().expect("longer than the size");
                ring.floor = seq;
                inner.bytes -= frame_cost(&dropped);
            }
            inner.order.push_back(Slot {
                seq: position.seq,
                ms: now,
                channel,
            });
        }
        inner.trim(now, self.ttl, self.max_bytes);
        self.bytes.store(inner.bytes, Ordering::Relaxed);
        (position, frame)
    }

    /// Drops what expired; the gateway calls it every second, so an idle history gives its memory
    /// back within a second of its TTL.
    pub fn expire(&self) {
        self.expire_at(now_ms());
    }

    fn expire_at(&self, now: u64) {
        let mut inner = self.inner.lock();
        let now = now.max(inner.last.ms);
        inner.trim(now, self.ttl, self.max_bytes);
        self.bytes.store(inner.bytes, Ordering::Relaxed);
    }

    /// What `names` keep after `after`, and where the history stands, in one look: a publish
    /// either is in it or gets a later position.
    pub fn snapshot(&self, names: &[&str], after: u64) -> (Now, Vec<Kept>) {
        let inner = self.inner.lock();
        let mut now = inner.last;
        now.ms = now_ms().max(now.ms);
        let kept = names
            .iter()
            .map(|&name| match inner.channels.get(name) {
                None => Kept::default(),
                Some(ring) => Kept {
                    known: true,
                    floor: ring.floor,
                    frames: ring
                        .entries
                        .iter()
                        .rev()
                        .take_while(|(seq, _)| *seq > after)
                        .map(|(_, frame)| frame.clone())
                        .collect(),
                },
            })
            .collect();
        let now = Now {
            position: now,
            forgotten_through: inner.forgotten_through,
        };
        (now, kept)
    }
}

impl Inner {
    /// Drops from the front of the global order what is past the TTL, then what the byte bound
    /// cannot hold.
    fn trim(&mut self, now: u64, ttl: Duration, max_bytes: usize) {
        let horizon = now.saturating_sub(ttl.as_millis() as u64);
        while let Some(slot) = self.order.front() {
            let expired = slot.ms <= horizon;
            if !expired && self.bytes <= max_bytes {
                break;
            }
            let slot = self.order.pop_front().expect("front exists");
            self.bytes -= ENTRY_OVERHEAD;
            let Some(ring) = self.channels.get_mut(&slot.channel) else {
                continue;
            };
            if ring
                .entries
                .front()
                .is_some_and(|(seq, _)| *seq == slot.seq)
            {
                let (seq, frame) = ring.entries.pop_front().expect("front exists");
                self.bytes -= frame_cost(&frame);
                ring.floor = seq;
                if !expired {
                    self.forgotten_through = seq;
                }
            }
            if ring.entries.is_empty() {
                // Expired or forgotten: [`super::resolve`] judges an unknown channel by the
                // position's age and `forgotten_through`, so its floor need not be kept.
                if !expired {
                    self.forgotten_through = self.forgotten_through.max(ring.floor);
                }
                self.channels.remove(&slot.channel);
                self.bytes -= CHANNEL_OVERHEAD + slot.channel.len();
            }
        }
        // Tables sized for a peak give it back once the history is far below it (expiry after a
        // burst of channels), rather than holding it for the process's life.
        if self.channels.capacity() > 1024 && self.channels.capacity() > 4 * self.channels.len() {
            self.channels.shrink_to(2 * self.channels.len());
        }
        if self.order.capacity() > 1024 && self.order.capacity() > 4 * self.order.len() {
            self.order.shrink_to(2 * self.order.len());
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::position_of;

    fn event(data: &str) -> Event<'_> {
        Event {
            data,
            ..Event::default()
        }
    }

    fn kept_seqs(store: &Store, name: &str) -> Vec<u64> {
        let (_, kept) = store.snapshot(&[name], 0);
        let mut seqs: Vec<u64> = kept[0]
            .frames
            .iter()
            .map(|f| position_of(f).unwrap().seq)
            .collect();
        seqs.sort_unstable();
        seqs
    }

    #[test]
    fn each_channel_keeps_its_newest_size_events_and_records_the_floor() {
        let store = Store::new(3, Duration::from_secs(60), 1 << 20);
        for i in 0..5 {
            let names: &[&str] = if i % 2 == 0 { &["a", "b"] } else { &["a"] };
            store.record(names, &event("x"));
        }
        assert_eq!(kept_seqs(&store, "a"), vec![3, 4, 5]);
        assert_eq!(kept_seqs(&store, "b"), vec![1, 3, 5]);
        let (_, kept) = store.snapshot(&["a", "b"], 3);
        assert_eq!((kept[0].floor, kept[1].floor), (2, 0));
        assert_eq!(kept[0].frames.len(), 2);
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_across_channels_and_counts_back_to_zero() {
        let data = "y".repeat(1000);
        // A frame is the data plus `data: `, the id line and the line ends: under 1100 B.
        let max = 20 * (1100 * 5 / 4 + ENTRY_OVERHEAD + CHANNEL_OVERHEAD + 4);
        let store = Store::new(10, Duration::from_secs(60), max);
        for i in 0..1000 {
            let name = format!("c{i}");
            store.record(&[&name], &event(&data));
            assert!(store.bytes() <= max, "{} > {max}", store.bytes());
        }
        // The newest channels are kept, the oldest forgotten (and remembered as forgotten).
        assert_eq!(kept_seqs(&store, "c999"), vec![1000]);
        assert!(kept_seqs(&store, "c0").is_empty());
        let (now, _) = store.snapshot(&["c0"], 0);
        assert!(now.forgotten_through >= 980, "{}", now.forgotten_through);
        assert!(store.inner.lock().channels.len() <= 20);
    }

    #[test]
    fn expired_events_are_dropped_and_their_bytes_given_back() {
        let store = Store::new(10, Duration::from_secs(1), 1 << 20);
        let (position, _) = store.record(&["a"], &event("x"));
        store.expire_at(position.ms + 999);
        assert!(store.bytes() > 0);
        store.expire_at(position.ms + 1000);
        assert_eq!(store.bytes(), 0);
        assert!(store.inner.lock().channels.is_empty());
    }
}
