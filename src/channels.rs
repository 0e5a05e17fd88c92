//! Channels: which open streams are in which named channel (PROTOCOL §8), for one-request fan-out.
//!
//! Owns membership only: a sharded map from channel name to a slab of member streams, and on each
//! stream a small map from the channels it holds to its slot in each, so joining and leaving cost a
//! hash lookup plus a slab insert/remove per name in the request, whatever the stream already holds
//! (PROTOCOL §9: a list scan made 100k subscribes quadratic), and a disconnect leaves every channel
//! of the stream without searching any of them. `MAX_CHANNELS_PER_STREAM` is enforced here, under
//! the stream's membership lock, so a join that would pass it changes nothing.
//! A channel exists only while it has members: the last leave removes it, so churn leaves nothing,
//! and tells the hook given to [`Channels::with_emptied`] (a cluster node stops listening to it).
//! It does not queue frames or end streams: a publish takes a snapshot of the members here and
//! delivers outside every lock, so a fan-out to 18k streams holds one channel shard's lock only for
//! the copy of 18k pointers (measured in BENCHMARKS.md), never across the deliveries.
//!
//! Lock order: a stream's membership lock, then a channel shard's lock; never the reverse.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, DefaultHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use slab::Slab;

use crate::stream::Stream;

const SHARDS: usize = 64;
pub const MAX_NAME_BYTES: usize = 256;

/// A channel name is 1–256 bytes of visible ASCII (`!`–`~`), matched exactly.
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_BYTES).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic())
}

/// A JSON array of valid channel names, or `None` (not an array, or any item not a valid name).
/// The one check behind a connect answer's `channels`, subscribe/unsubscribe and publish.
pub fn parse_names(value: &serde_json::Value) -> Option<Vec<&str>> {
    value
        .as_array()?
        .iter()
        .map(|item| item.as_str().filter(|name| is_valid_name(name)))
        .collect()
}

/// A stream's channels: name → its slot in that channel's slab, so leaving is O(1).
pub type Memberships = HashMap<Arc<str>, usize, ProcessHasher>;

/// SipHash keyed once per process. Zero-sized, so a stream's (usually empty) membership map costs
/// 32 B rather than the 48 B of a map that carries its own `RandomState`; keyed, so names chosen to
/// collide cannot turn a join into a long probe.
#[derive(Clone, Copy, Default)]
pub struct ProcessHasher;

impl BuildHasher for ProcessHasher {
    type Hasher = DefaultHasher;

    fn build_hasher(&self) -> DefaultHasher {
        static KEYS: OnceLock<RandomState> = OnceLock::new();
        KEYS.get_or_init(RandomState::new).build_hasher()
    }
}

/// A join that would put a stream in more than `MAX_CHANNELS_PER_STREAM` channels.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManyChannels {
    pub limit: usize,
}

type Shard = HashMap<Arc<str>, Slab<Arc<Stream>>>;

/// Called with a channel's name after its last member left, outside the channel shard's lock.
pub type Emptied = Box<dyn Fn(Arc<str>) + Send + Sync>;

pub struct Channels {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    count: AtomicUsize,
    emptied: Option<Emptied>,
}

impl Default for Channels {
    fn default() -> Self {
        Channels::new()
    }
}

impl Channels {
    pub fn new() -> Channels {
        Channels::with_emptied(None)
    }

    pub fn with_emptied(emptied: Option<Emptied>) -> Channels {
        Channels {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            count: AtomicUsize::new(0),
            emptied,
        }
    }

    fn shard(&self, name: &str) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one(name) as usize % SHARDS]
    }

    /// Channels that have at least one member.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `stream` to each named channel it is not in yet, unless that would put it in more than
    /// `limit` channels: then nothing changes. A stream that has ended joins nothing.
    pub fn join<'a>(
        &self,
        stream: &Arc<Stream>,
        names: impl IntoIterator<Item = &'a str>,
        limit: usize,
    ) -> Result<(), TooManyChannels> {
        let mut memberships = stream.memberships.lock();
        if stream.has_ended() {
            return Ok(());
        }
        let mut new: HashSet<&str, ProcessHasher> = HashSet::default();
        for name in names {
            if !memberships.contains_key(name)
                && new.insert(name)
                && memberships.len() + new.len() > limit
            {
                return Err(TooManyChannels { limit });
            }
        }
        memberships.reserve(new.len());
        for name in new {
            let mut shard = self.shard(name).lock();
            let channel = match shard.get_key_value(name) {
                Some((key, _)) => key.clone(),
                None => {
                    let key: Arc<str> = Arc::from(name);
                    shard.insert(key.clone(), Slab::new());
                    self.count.fetch_add(1, Ordering::Relaxed);
                    key
                }
            };
            let members = shard
                .get_mut(name)
                .expect("present: found or inserted above");
            let slot = members.insert(stream.clone());
            memberships.insert(channel, slot);
        }
        Ok(())
    }

    /// Removes `stream` from each named channel it is in.
    pub fn leave<'a>(&self, stream: &Stream, names: impl IntoIterator<Item = &'a str>) {
        let mut memberships = stream.memberships.lock();
        for name in names {
            if let Some((channel, slot)) = memberships.remove_entry(name) {
                self.remove(&channel, slot);
            }
        }
    }

    /// Removes `stream` from every channel (at its end).
    pub fn leave_all(&self, stream: &Stream) {
        let memberships = std::mem::take(&mut *stream.memberships.lock());
        for (channel, slot) in memberships {
            self.remove(&channel, slot);
        }
    }

    fn remove(&self, channel: &Arc<str>, slot: usize) {
        let mut shard = self.shard(channel).lock();
        if let Some(members) = shard.get_mut(&**channel) {
            members.try_remove(slot);
            if members.is_empty() {
                shard.remove(&**channel);
                self.count.fetch_sub(1, Ordering::Relaxed);
                drop(shard);
                if let Some(emptied) = &self.emptied {
                    emptied(channel.clone());
                }
            }
        }
    }

    /// Whether `name` has members now.
    pub fn contains(&self, name: &str) -> bool {
        self.shard(name).lock().contains_key(name)
    }

    /// Every channel with members, one shard at a time (a cluster node's rejoin).
    pub fn names(&self) -> Vec<Arc<str>> {
        let mut names = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            names.extend(shard.lock().keys().cloned());
        }
        names
    }

    /// Appends the members of `name` to `out`. The shard lock is held only for this copy.
    pub fn members(&self, name: &str, out: &mut Vec<Arc<Stream>>) {
        let shard = self.shard(name).lock();
        if let Some(members) = shard.get(name) {
            out.reserve(members.len());
            out.extend(members.iter().map(|(_, s)| s.clone()));
        }
    }

    /// Members of any of `names`, each stream once.
    pub fn members_of_any<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<Arc<Stream>> {
        let mut out = Vec::new();
        let mut listed = 0;
        for name in names {
            self.members(name, &mut out);
            listed += 1;
        }
        if listed > 1 {
            out.sort_unstable_by_key(Arc::as_ptr);
            out.dedup_by(|a, b| Arc::ptr_eq(a, b));
        }
        out
    }

    /// Channel names `stream` is in (for tests and debugging).
    pub fn channels_of(&self, stream: &Stream) -> Vec<String> {
        let memberships = stream.memberships.lock();
        let mut names: Vec<String> = memberships.keys().map(|c| c.to_string()).collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Token;
    use bytes::Bytes;
    use std::collections::{BTreeSet, HashMap as Map};

    fn stream() -> Arc<Stream> {
        Arc::new(Stream::new(Token::random(), Bytes::new()))
    }

    #[test]
    fn names_are_visible_ascii_of_bounded_length() {
        assert!(is_valid_name("prices"));
        assert!(is_valid_name("user.42:!~"));
        assert!(is_valid_name(&"x".repeat(256)));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(&"x".repeat(257)));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("caf\u{e9}"));
        assert!(!is_valid_name("tab\t"));
    }

    /// Random joins, leaves and ends against a naive map of sets.
    #[test]
    fn agrees_with_a_naive_model_and_leaves_nothing_behind() {
        let channels = Channels::new();
        let streams: Vec<_> = (0..50).map(|_| stream()).collect();
        let names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let mut model: Map<String, BTreeSet<usize>> = Map::new();
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as usize
        };
        for _ in 0..100_000 {
            let s = next() % streams.len();
            let c = &names[next() % names.len()];
            match next() % 5 {
                0 | 1 => {
                    channels
                        .join(&streams[s], [c.as_str()], usize::MAX)
                        .unwrap();
                    model.entry(c.clone()).or_default().insert(s);
                }
                2 | 3 => {
                    channels.leave(&streams[s], [c.as_str()]);
                    if let Some(set) = model.get_mut(c) {
                        set.remove(&s);
                    }
                }
                _ => {
                    channels.leave_all(&streams[s]);
                    model.values_mut().for_each(|set| {
                        set.remove(&s);
                    });
                }
            }
            model.retain(|_, set| !set.is_empty());
            assert_eq!(channels.len(), model.len());
        }
        for name in &names {
            let mut got: Vec<usize> = Vec::new();
            let mut members = Vec::new();
            channels.members(name, &mut members);
            for m in members {
                got.push(streams.iter().position(|s| Arc::ptr_eq(s, &m)).unwrap());
            }
            got.sort();
            let want: Vec<usize> = model
                .get(name)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            assert_eq!(got, want, "{name}");
        }
        streams.iter().for_each(|s| channels.leave_all(s));
        assert_eq!(channels.len(), 0);
        assert!(channels.shards.iter().all(|s| s.lock().is_empty()));
    }

    #[test]
    fn a_stream_in_several_listed_channels_is_listed_once() {
        let channels = Channels::new();
        let (a, b) = (stream(), stream());
        channels.join(&a, ["x", "y", "x"], 2).unwrap();
        channels.join(&b, ["y"], 1).unwrap();
        assert_eq!(channels.channels_of(&a), vec!["x", "y"]);
        assert_eq!(channels.members_of_any(["x", "y"]).len(), 2);
        assert_eq!(channels.members_of_any(["x", "x"]).len(), 1);
        assert_eq!(channels.members_of_any(["nobody"]).len(), 0);
    }

    #[test]
    fn an_ended_stream_joins_nothing() {
        let channels = Channels::new();
        let s = stream();
        s.end(crate::stream::EndReason::ClientClosed);
        channels.join(&s, ["x"], 1).unwrap();
        assert!(channels.is_empty());
    }

    #[test]
    fn the_limit_counts_distinct_new_names_and_a_refused_join_changes_nothing() {
        let channels = Channels::new();
        let s = stream();
        channels.join(&s, ["a", "b", "a"], 3).unwrap();
        // "a" and "b" are held: only "c" is new, so 3 is reached, not passed.
        channels.join(&s, ["a", "b", "c", "c"], 3).unwrap();
        assert_eq!(
            channels.join(&s, ["a", "d", "e"], 4),
            Err(TooManyChannels { limit: 4 })
        );
        assert_eq!(channels.channels_of(&s), vec!["a", "b", "c"]);
        assert_eq!(channels.len(), 3);
        channels.join(&s, ["d"], 4).unwrap();
        assert_eq!(channels.len(), 4);
    }
}
